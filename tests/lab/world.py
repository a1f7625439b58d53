"""A seed lab with a real NetworkManager, our dispatcher hook and/or our daemon installed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

from tests.lab.netns import ROOT, Lab, Seed, wait_for
from tests.lab.nm import NMLab

VENV_BIN = os.path.dirname(sys.executable)
HOOK = os.path.join(ROOT, "dispatcher.d", "50-nm-policy-routing")
WATCH = os.path.join(ROOT, "tests", "lab", "activation_watch.py")
CLI = os.path.join(VENV_BIN, "nm-policy-routing")
PROTO = ("214", "nm-policy-routing")


def install_hook(dispatcher_dir: str) -> None:
    """As a package would: the hook, and pre-up.d/pre-down.d symlinks to it."""
    target = os.path.join(dispatcher_dir, "50-nm-policy-routing")
    shutil.copyfile(HOOK, target)
    os.chmod(target, 0o755)
    for sub in ("pre-up.d", "pre-down.d"):
        os.makedirs(os.path.join(dispatcher_dir, sub), exist_ok=True)
        link = os.path.join(dispatcher_dir, sub, "50-nm-policy-routing")
        if not os.path.lexists(link):
            os.symlink("../50-nm-policy-routing", link)


class World:
    """Seed + NetworkManager (+ hook) (+ daemon); everything stopped by :meth:`close`."""

    def __init__(self, lab: Lab, hook: bool = True) -> None:
        self.seed = Seed.build(lab, address_host=False)
        self.base = tempfile.mkdtemp(prefix="npr-world-")
        self.state_dir = os.path.join(self.base, "state")
        os.makedirs(self.state_dir)
        path = f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        self.nm = NMLab(self.seed, os.path.join(self.base, "nm"), env={"PATH": path},
                        binds={"/run/nm-policy-routing": self.state_dir})
        self.daemon: Optional[subprocess.Popen] = None
        self.nm.start()
        if hook:
            install_hook(self.nm.dispatcher_dir)

    @property
    def host(self):
        return self.seed.host

    def cli_env(self) -> Dict[str, str]:
        env = self.nm.env()
        env["NM_POLICY_ROUTING_STATE_DIR"] = self.state_dir
        return env

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.host.run(CLI, *args, env=self.cli_env(), check=check)

    # ---- the daemon ----------------------------------------------------

    def start_daemon_faulty(self, fault_at: int, timeout: float = 20) -> bool:
        """Start the daemon with a fault point armed; True if it killed itself before it was ready."""
        env = self.cli_env()
        env["NM_POLICY_ROUTING_FAULT_AT"] = str(fault_at)
        log_path = os.path.join(self.base, f"daemon-fault-{fault_at}.log")

        def ready() -> bool:
            with open(log_path) as handle:
                return "daemon ready" in handle.read()

        with open(log_path, "w") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", self.host.name, CLI, "daemon"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            wait_for(lambda: proc.poll() is not None or ready(), timeout=timeout)
            killed = proc.poll() is not None and proc.returncode == -9
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)
        return killed

    def start_daemon(self, timeout: float = 20) -> None:
        notify_path = os.path.join(self.base, "notify.sock")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify_path)
        sock.settimeout(timeout)
        env = self.cli_env()
        env["NOTIFY_SOCKET"] = notify_path
        self.daemon_log = open(os.path.join(self.base, "daemon.log"), "a")
        self.daemon = subprocess.Popen(["ip", "netns", "exec", self.host.name, CLI, "-v", "daemon"], env=env,
                                       stdout=self.daemon_log, stderr=subprocess.STDOUT)
        try:
            while True:
                message = sock.recv(4096).decode()
                if "READY=1" in message:
                    break
        except socket.timeout:
            raise AssertionError(f"the daemon did not become ready: {self.daemon_tail()}") from None
        finally:
            sock.close()

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
            try:
                self.daemon.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
            self.daemon = None
            self.daemon_log.close()

    def watch_activations(self, count: int) -> List[Dict[str, Any]]:
        """Bring 'service' up and down ``count`` times while activation_watch.py (D-Bus and netlink
        on one loop, in the host namespace) watches: per activation, were our rule and table
        route in the kernel when ACTIVATED arrived, or how long after."""
        from tests.lab.nm import SERVICE_UUID

        ready, progress = (os.path.join(self.base, name) for name in ("watch.ready", "watch.progress"))
        watcher = subprocess.Popen(["ip", "netns", "exec", self.host.name, sys.executable, WATCH, SERVICE_UUID,
                                    "100", str(count), ready, progress], env=self.cli_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if not wait_for(lambda: os.path.exists(ready), timeout=20):
                raise AssertionError("the activation watcher did not start")
            for n in range(count):
                self.nm.up("service")
                self.nm.down("service")
                if not wait_for(lambda: _lines(progress) > n, timeout=20):
                    raise AssertionError(f"the watcher missed deactivation {n}")
            out, _ = watcher.communicate(timeout=60)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
        return json.loads(out)["activations"]

    def daemon_tail(self, lines: int = 30) -> str:
        try:
            with open(os.path.join(self.base, "daemon.log")) as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        self.stop_daemon()
        self.nm.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # ---- what the kernel holds -----------------------------------------

    def event_env(self, uuid: str, action_iface: str = "eth1") -> Dict[str, str]:
        """The environment NetworkManager's dispatcher gives a hook for this connection."""
        env = self.cli_env()
        env.update(CONNECTION_UUID=uuid, DEVICE_IFACE=action_iface, DEVICE_IP_IFACE=action_iface)
        return env

    def dispatch(self, uuid: str, action: str, extra_env: Optional[Dict[str, str]] = None,
                 iface: str = "eth1") -> subprocess.CompletedProcess:
        env = self.event_env(uuid, iface)
        env.update(extra_env or {})
        return self.host.run(CLI, "dispatch", iface, action, env=env, check=False)

    def set_user_data_unchecked(self, uuid: str, data: Dict[str, str]) -> bool:
        """Write a profile's user data over D-Bus without our validation (as any NM client could);
        False if NetworkManager itself refused it."""
        code = (
            "import asyncio, json, sys\n"
            "from nm_policy_routing.adapters.networkmanager import NetworkManagerBus\n"
            "async def go():\n"
            "    nm = await NetworkManagerBus().connect()\n"
            "    path, _ = await nm.find_profile(sys.argv[1])\n"
            "    await nm.set_user_data(path, json.loads(sys.argv[2]))\n"
            "asyncio.run(go())\n")
        proc = self.host.run(sys.executable, "-c", code, uuid, json.dumps(data), env=self.cli_env(), check=False)
        if proc.returncode and "Settings.Connection.Failed" not in proc.stderr:
            raise RuntimeError(proc.stderr)
        return proc.returncode == 0

    def our_rules(self, family: str = "-4", forward: bool = False) -> List[Dict[str, Any]]:
        """Our rules; the forward rule of an incoming policy (``iif IFACE ... lookup main``)
        only with ``forward``."""
        return [r for r in self.host.ipj(family, "rule") if str(r.get("protocol")) in PROTO
                and (forward or "iif" not in r)]

    def our_routes(self, family: str = "-4") -> List[Dict[str, Any]]:
        return [r for r in self.host.ipj(family, "route", "show", "table", "all")
                if str(r.get("protocol")) in PROTO]

    def has_nft(self) -> bool:
        return self.host.run("nft", "list", "table", "inet", "nm_policy_routing", check=False).returncode == 0

    def policy_state(self) -> Dict[str, Any]:
        """Everything a policy may change in the host namespace (NM's own routes left out)."""
        nft = json.loads(self.host.run("nft", "-j", "list", "ruleset").stdout or "{}")
        for item in nft.get("nftables", []):
            item.pop("metainfo", None)
            for obj in item.values():  # handles change when a table is made anew
                if isinstance(obj, dict):
                    obj.pop("handle", None)
                    if isinstance(obj.get("elem"), list):
                        obj["elem"] = sorted(obj["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        # the same table, whatever order its chains and elements were added in (a chain's rules
        # keep their order: the sort is stable and rules sort by their chain only)
        nft["nftables"] = sorted(nft.get("nftables", []), key=_nft_order)
        return {
            "rules4": self.host.ipj("-4", "rule"),
            "rules6": self.host.ipj("-6", "rule"),
            "ours4": self.our_routes("-4"),
            "ours6": self.our_routes("-6"),
            "nft": nft,
            "svm": [self.host.conf("ipv4", i, "src_valid_mark") for i in ("eth0", "eth1")],
            "rpf": [self.host.conf("ipv4", i, "rp_filter") for i in ("eth0", "eth1")],
        }

    def wait_rules(self, predicate, timeout: float = 15) -> bool:
        return bool(wait_for(lambda: predicate(self.our_rules()), timeout=timeout))


def _nft_order(item: Dict[str, Any]) -> tuple:
    if "rule" in item:
        rule = item["rule"]
        return ("rule", rule.get("family"), rule.get("table"), rule.get("chain"), "")
    return ("", "", "", "", json.dumps(item, sort_keys=True))


def _lines(path: str) -> int:
    try:
        with open(path) as handle:
            return len(handle.readlines())
    except FileNotFoundError:
        return 0
