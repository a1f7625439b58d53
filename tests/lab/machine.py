"""A Debian 13 machine booted with systemd as PID 1 in a container, wired to a lab.

Its job: boot (and reboot, and power off) the tree /var/tmp/npr-machine with
``systemd-nspawn --boot --private-network`` and run commands in it, leaving nothing
behind on this machine:

- the tree is a copy of the deb-test tree (tests/lab/trixie.py) plus systemd,
  systemd-sysv, dbus, polkitd and NetworkManager; it is kept as a cache and never
  booted itself: each run boots an overlay (lowerdir = the tree, upperdir = the run's
  own directory) mounted in a private mount namespace, so it vanishes with nspawn.
  A reboot powers off and boots the same upperdir again (/etc, /var stay; /run is new);
- nspawn runs in a cgroup2 subtree of its own, removed at the end
  (``--register=no --keep-unit``: no systemd needed on this host; cgroup2 is at
  /sys/fs/cgroup/unified on a hybrid host like the build machine, else /sys/fs/cgroup);
  ``--system-call-filter=bpf`` lets the service's ``IPAddressDeny=`` and
  ``DevicePolicy=`` work inside;
- NICs: veth pairs made from outside in PID 1's network namespace (``ip netns attach``),
  while a oneshot unit ordered before NetworkManager waits for them, as NICs appear
  at boot. Nothing touches the root network namespace.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, Optional, Sequence

from tests.lab.netns import Netns, Seed, run, wait_for
from tests.lab.nm import mgmt_keyfile, service_keyfile
from tests.lab.trixie import TREE, Tree

MACHINE_TREE = os.environ.get("NPR_MACHINE_TREE", "/var/tmp/npr-machine")
PACKAGES = ("systemd", "systemd-sysv", "dbus", "polkitd", "network-manager", "iproute2", "iputils-ping",
            "nftables", "procps", "util-linux", "python3-pyroute2")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

NICS_UNIT = """[Unit]
Description=nm-policy-routing machine-test: wait for the NICs (veth pairs made from outside)
DefaultDependencies=no
Before=NetworkManager.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for i in $(seq 600); do ip link show eth0 >/dev/null 2>&1 && ip link show eth1 >/dev/null 2>&1 && exit 0; sleep 0.1; done; exit 1'
"""
NM_CONF = "[main]\nno-auto-default=*\ndns=none\n"

# $1 cgroup, $2 tree, $3 upper, $4 work, $5 merged, $6 machine name. A private mount namespace:
# the overlay ends with nspawn.
BOOT = """set -eu
echo $$ > "$1/cgroup.procs"
mount -t overlay overlay -o "lowerdir=$2,upperdir=$3,workdir=$4" "$5"
rm -f "$5/usr/sbin/policy-rc.d"
export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
exec systemd-nspawn --boot --private-network --register=no --keep-unit --machine="$6" \
    --console=read-only --system-call-filter=bpf -D "$5"
"""


class MachineError(RuntimeError):
    """The machine could not be prepared, booted or powered off; the message says which."""


def cgroup2_root() -> str:
    """Where cgroup2 is mounted: /sys/fs/cgroup (a unified host, e.g. Debian 12 with systemd),
    or /sys/fs/cgroup/unified (a hybrid host, such as this project's build machine)."""
    for path in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if os.path.exists(os.path.join(path, "cgroup.controllers")):
            return path
    raise MachineError("no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: "
                       "systemd in the container needs one")


# ---- the tree ---------------------------------------------------------------------


def ensure_tree(log_dir: str) -> str:
    """The machine tree: a copy of the deb-test tree (made if missing) with the machine's packages."""
    tree = Tree(MACHINE_TREE, log_dir)
    if not tree.complete():
        source = Tree(TREE, log_dir)
        print(f"  {source.ensure()}; {source.prepare()}", flush=True)
        partial = MACHINE_TREE + ".partial"
        subprocess.run(["rm", "-rf", "--one-file-system", partial], check=True)
        print(f"  copying {source.path} to {MACHINE_TREE}", flush=True)
        subprocess.run(["cp", "-a", "--one-file-system", source.path, partial], check=True)
        os.rename(partial, MACHINE_TREE)
    missing = [p for p in PACKAGES if not tree.installed(p)]
    if missing:
        print(f"  installing into {MACHINE_TREE}: {' '.join(missing)}", flush=True)
        tree.run("apt-get", "update", network="root", log="apt.log")
        tree.install(missing)
    return MACHINE_TREE


# ---- the machine ---------------------------------------------------------------------


class Machine:
    """One booted container over an overlay of ``tree``; :meth:`close` powers off and cleans up."""

    def __init__(self, tree: str, seed: Seed, log_dir: str, name: Optional[str] = None) -> None:
        self.tree = tree
        self.seed = seed  # mon + rtr of the lab; the machine is its host
        self.log_dir = log_dir
        self.name = name or f"{seed.lab.prefix}machine"
        self.cgroup = os.path.join(cgroup2_root(), self.name)
        self.state = tempfile.mkdtemp(prefix="npr-machine-", dir="/var/tmp")
        for sub in ("upper", "work", "merged"):
            os.makedirs(os.path.join(self.state, sub))
        self.proc: Optional[subprocess.Popen] = None
        self.pid1: Optional[int] = None
        self.boots = 0
        self.netns = Netns(self.name)
        #: MainPIDs of the service of the previous package version (its journal entries are its own)
        self.previous_pids: set = set()

    @property
    def upper(self) -> str:
        return os.path.join(self.state, "upper")

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """A file in the machine's /etc or /var; before the first boot only (in the upperdir)."""
        assert self.boots == 0, "write into a running machine with exec()"
        target = os.path.join(self.upper, path.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as handle:
            handle.write(text)
        os.chmod(target, mode)

    def configure(self) -> None:
        """NICs unit, NetworkManager config, the seed's two profiles (autoconnect)."""
        self.write("/etc/systemd/system/npr-lab-nics.service", NICS_UNIT)
        wants = os.path.join(self.upper, "etc/systemd/system/NetworkManager.service.wants")
        os.makedirs(wants, exist_ok=True)
        os.symlink("/etc/systemd/system/npr-lab-nics.service", os.path.join(wants, "npr-lab-nics.service"))
        self.write("/etc/NetworkManager/conf.d/90-npr-lab.conf", NM_CONF)
        for name, text in (("mgmt", mgmt_keyfile()), ("service", service_keyfile())):
            text = text.replace("autoconnect=false", "autoconnect=true")
            self.write(f"/etc/NetworkManager/system-connections/{name}.nmconnection", text, 0o600)

    # ---- power ---------------------------------------------------------------------

    def boot(self, timeout: float = 120) -> float:
        """Boot, wire eth0/eth1 to the lab's router, wait until systemd is up; returns seconds."""
        started = time.monotonic()
        os.makedirs(self.cgroup, exist_ok=True)
        self.boots += 1
        console = open(os.path.join(self.log_dir, f"console-{self.boots}.log"), "w")
        args = [os.path.join(self.state, d) for d in ("upper", "work", "merged")]
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", BOOT, "boot",
                                      self.cgroup, self.tree, *args, self.name],
                                     stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        console.close()
        procs = os.path.join(self.cgroup, "payload", "init.scope", "cgroup.procs")
        pid = wait_for(lambda: _first_pid(procs), timeout=30)
        if not pid:
            raise MachineError(f"boot {self.boots}: no PID 1 in {procs} after 30 s "
                               f"(console: {self.log_dir}/console-{self.boots}.log)")
        self.pid1 = pid
        run(["ip", "netns", "attach", self.name, str(pid)])
        self.seed.host = self.netns
        self.seed.add_host_links(address_host=False)
        def settled() -> Optional[str]:  # systemctl answers once PID 1's bus is up
            out = self.exec("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            return out.stdout.strip() or None
        state = wait_for(settled, timeout, 0.2) or ""
        if state not in ("running", "degraded"):
            raise MachineError(f"boot {self.boots}: systemd says {state!r}; failed units: "
                               + self.exec("systemctl", "--failed", "--no-legend", check=False).stdout)
        return time.monotonic() - started

    def poweroff(self, timeout: float = 60) -> None:
        """systemctl poweroff, wait for nspawn to end (SIGKILL after ``timeout``); unbind the netns."""
        if self.proc is not None and self.proc.poll() is None:
            if self.pid1 is None or self.exec("systemctl", "poweroff", check=False, timeout=30).returncode:
                self.proc.terminate()  # nspawn asks the container's PID 1 to power off
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        self.pid1 = None
        run(["ip", "netns", "del", self.name], check=False)
        self._kill_cgroup()

    def reboot(self) -> float:
        self.poweroff()
        return self.boot()

    def close(self) -> None:
        """Power off (even half-booted), remove the cgroup and the run's directory."""
        try:
            self.poweroff()
        finally:
            shutil.rmtree(self.state, ignore_errors=True)

    def _kill_cgroup(self) -> None:
        """Whatever is left in our cgroup subtree is ours: kill it by PID, then remove the subtree."""
        if not os.path.isdir(self.cgroup):
            return
        for _ in range(50):
            pids = [p for d, _, files in os.walk(self.cgroup) if "cgroup.procs" in files
                    for p in open(os.path.join(d, "cgroup.procs")).read().split()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for directory, _, _ in sorted(os.walk(self.cgroup), key=lambda w: -w[0].count("/")):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        if os.path.isdir(self.cgroup):
            raise MachineError(f"cannot remove the cgroup {self.cgroup}: processes left in it")

    # ---- commands ----------------------------------------------------------------------

    def _enter(self, user: Optional[str]) -> list:
        if not self.pid1:
            raise MachineError("the machine is not running")
        prefix = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-C", "--",
                  "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "TERM=dumb", "SYSTEMD_PAGER=",
                  "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_COLORS=0"]
        if user:
            return prefix + [f"HOME=/home/{user}", "setpriv", f"--reuid={user}", f"--regid={user}",
                             "--init-groups", "--"]
        return prefix + ["HOME=/root"]

    def exec(self, *args: str, user: Optional[str] = None, check: bool = True, timeout: float = 120,
             input: Optional[bytes] = None) -> subprocess.CompletedProcess:
        """Run ``args`` in the machine (all its namespaces), as root or ``user``."""
        proc = subprocess.run(self._enter(user) + list(args), capture_output=True, timeout=timeout, input=input)
        out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                          proc.stderr.decode(errors="replace"))
        if check and proc.returncode != 0:
            raise MachineError(f"in the machine: {shlex.join(args)} failed ({proc.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-2000:]}")
        return out

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.exec("sh", "-c", script, **kw)

    def spawn(self, *args: str) -> subprocess.Popen:
        """A background process in the machine; the caller ends it (by this Popen)."""
        return subprocess.Popen(self._enter(None) + list(args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    def put(self, path: str, data: bytes, mode: str = "0644") -> None:
        self.sh(f"cat > {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}", input=data)

    def active(self) -> Dict[str, str]:
        """NetworkManager's active connections: name -> state."""
        out = self.exec("nmcli", "-t", "-f", "NAME,STATE", "connection", "show", "--active", check=False).stdout
        return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)

    def wait_active(self, names: Sequence[str], timeout: float = 60) -> bool:
        return bool(wait_for(lambda: all(self.active().get(n) == "activated" for n in names), timeout, 0.2))


def _first_pid(path: str) -> Optional[int]:
    try:
        with open(path) as handle:
            pids = handle.read().split()
    except OSError:
        return None
    return int(pids[0]) if pids else None
