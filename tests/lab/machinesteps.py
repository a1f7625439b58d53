"""The steps of ``./run machine-test`` (tests/lab/machinetest.py) and what they check.

Each check reads what a user would: the kernel of the machine (rules, routes, our nft
table, src_valid_mark), packets and interface counters from the monitoring host, the
installed CLI's exit codes and words, ``systemctl`` and ``journalctl``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

from tests.lab.debtest import POLICY, applied, clean
from tests.lab.demo import say, show, verdict
from tests.lab.machine import Machine, MachineError
from tests.lab.netns import ROOT, Seed, run, wait_for
from tests.lab.trixie import PACKAGE, Tree
from tests.lab.world import PROTO

CHANGELOG = "packaging/debian/changelog"
MODIFY_SYSTEM = "org.freedesktop.NetworkManager.settings.modify.system"
POLKIT_RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "%s" && subject.isInGroup("netadmin"))
        return polkit.Result.YES;
});
""" % MODIFY_SYSTEM
PACKAGE_FILES = ("/usr/bin/nm-policy-routing", "/usr/lib/NetworkManager/dispatcher.d/50-nm-policy-routing",
                 "/usr/lib/systemd/system/nm-policy-routing.service", "/etc/nm-policy-routing",
                 "/etc/iproute2/rt_protos.d/nm-policy-routing.conf", "/run/nm-policy-routing",
                 "/usr/lib/python3/dist-packages/nm_policy_routing",
                 "/etc/systemd/system/multi-user.target.wants/nm-policy-routing.service")
# Runs in the machine (realtime priority): samples every ~2 ms, by netlink dumps read raw,
# whether rule 1000 -> table 100 and table 100's IPv4 default route are in the kernel, until
# the file argv[1] exists; prints a JSON summary (samples, misses, intervals).
WATCHER = r"""
import json, os, socket, struct, sys, time
RTM_GETROUTE, RTM_GETRULE, NLMSG_ERROR, NLMSG_DONE, FRA_PRIORITY, TABLE = 26, 34, 2, 3, 6, 15
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
seq = 0

def dump(kind):
    global seq
    seq += 1
    body = struct.pack("=8BI", socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
    sock.send(struct.pack("=IHHII", 16 + len(body), kind, 0x301, seq, 0) + body)
    out = []
    while True:
        data, off = sock.recv(1 << 17), 0
        while off < len(data):
            length, mtype = struct.unpack_from("=IH", data, off)
            if mtype in (NLMSG_DONE, NLMSG_ERROR):
                return out
            out.append(data[off + 16:off + length])
            off += (length + 3) & ~3

def attrs(payload):
    found, off = {}, 12
    while off + 4 <= len(payload):
        size, kind = struct.unpack_from("=HH", payload, off)
        if size < 4:
            break
        found[kind & 0x3fff] = payload[off + 4:off + size]
        off += (size + 3) & ~3
    return found

def u32(found, kind, default):
    return struct.unpack("=I", found[kind])[0] if kind in found else default

def present():
    rule = any(u32(a, FRA_PRIORITY, 0) == 1000 and u32(a, TABLE, p[4]) == 100
               for p, a in ((p, attrs(p)) for p in dump(RTM_GETRULE)))
    route = any(p[1] == 0 and u32(attrs(p), TABLE, p[4]) == 100 for p in dump(RTM_GETROUTE))
    return rule and route

samples = misses = 0
gaps, last, started = [], None, time.monotonic()
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    ok = present()
    now = time.monotonic()
    if last is not None:
        gaps.append(now - last)
    last = now
    samples += 1
    misses += not ok
    time.sleep(0.002)
gaps.sort()
print(json.dumps({"samples": samples, "misses": misses, "seconds": time.monotonic() - started,
                  "median_ms": 1000 * gaps[len(gaps) // 2], "max_ms": 1000 * gaps[-1],
                  "over_10ms": sum(g > 0.010 for g in gaps)}))
"""


class Checks:
    """PASS/FAIL per check, grouped by step; the report at the end."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.current = "setup"
        self.results: List[Tuple[str, str, bool]] = []

    def step(self, title: str) -> None:
        self.current = title
        say(f"{title}   [{time.monotonic() - self.started:.0f} s]")

    def check(self, what: str, ok: bool) -> bool:
        self.results.append((self.current, what, bool(ok)))
        return verdict(what, bool(ok))

    def report(self) -> bool:
        say("Report")
        steps: Dict[str, List[bool]] = {}
        for step, _, ok in self.results:
            steps.setdefault(step, []).append(ok)
        for step, oks in steps.items():
            print(f"  {'PASS' if all(oks) else 'FAIL'}  {step} ({sum(oks)}/{len(oks)} checks)")
        for step, what, ok in self.results:
            if not ok:
                print(f"  failed: {step}: {what}")
        return all(ok for _, _, ok in self.results) and bool(self.results)


def root_netns() -> Dict[str, Any]:
    """This machine's own networking, to compare before and after (links, rules, routes, nft)."""
    state = {"links": sorted(link["ifname"] for link in json.loads(run(["ip", "-j", "link"]).stdout))}
    for family in ("-4", "-6"):
        state[f"rules{family}"] = run(["ip", family, "rule"]).stdout
        state[f"routes{family}"] = run(["ip", family, "route", "show", "table", "all"]).stdout
    state["nft"] = run(["nft", "list", "ruleset"], check=False).stdout
    return state


# ---- the packages ------------------------------------------------------------------


def _git(*args: str) -> str:
    return run(["git", "-c", f"safe.directory={ROOT}", "-C", ROOT, *args]).stdout


def _versions(changelog: str) -> List[str]:
    return re.findall(rf"^{PACKAGE} \(([^)]+)\)", changelog, re.M)


def builds(tree_path: str, log_dir: str, previous: Optional[str] = None) -> Dict[str, Tuple[str, str]]:
    """{"previous"|"current": (version, host path of the .deb)}: HEAD, and the newest commit whose
    changelog's top version is the version before HEAD's (so it keeps working for later versions),
    or the commit ``previous``."""
    versions = _versions(_git("show", f"HEAD:{CHANGELOG}"))
    if previous:
        versions[1:2] = [_versions(_git("show", f"{previous}:{CHANGELOG}"))[0]]
    if len(versions) < 2:
        raise MachineError(f"{CHANGELOG} has no previous version to upgrade from")
    for commit in [] if previous else _git("rev-list", "HEAD").split():
        shown = subprocess.run(["git", "-c", f"safe.directory={ROOT}", "-C", ROOT, "show", f"{commit}:{CHANGELOG}"],
                               capture_output=True, text=True)  # fails where the file did not exist yet
        top = _versions(shown.stdout)
        if top and top[0] == versions[1]:
            previous = commit
            break
    if previous is None:
        raise MachineError(f"no commit has version {versions[1]} at the top of {CHANGELOG}")
    tree = Tree(tree_path, log_dir)
    out: Dict[str, Tuple[str, str]] = {}
    for name, commit, version in (("previous", previous, versions[1]), ("current", "HEAD", versions[0])):
        tar = subprocess.run(["git", "-c", f"safe.directory={ROOT}", "-C", ROOT, "archive",
                              f"--prefix={PACKAGE}/", commit], capture_output=True, check=True).stdout
        deb = tree.build(tar)
        target = os.path.join(tree.log_dir, os.path.basename(deb))
        os.replace(tree.inside(deb), target)
        print(f"  {name}: {version} from {_git('log', '-1', '--format=%h %s', commit).strip()}: {target}")
        out[name] = (version, target)
    return out


# ---- what the machine's kernel holds ---------------------------------------------------


def ours(m: Machine) -> Dict[str, Any]:
    """Our rules and routes (protocol 214), our nft table, eth1's src_valid_mark, in the machine."""
    ns = m.netns
    rules = [r for f in ("-4", "-6") for r in ns.ipj(f, "rule") if str(r.get("protocol")) in PROTO]
    routes = [r for f in ("-4", "-6") for r in ns.ipj(f, "route", "show", "table", "all")
              if str(r.get("protocol")) in PROTO]
    nft = m.exec("nft", "list", "table", "inet", "nm_policy_routing", check=False).returncode == 0
    return {"rules": rules, "routes": routes, "nft": nft, "svm": ns.conf("ipv4", "eth1", "src_valid_mark")}


def exactly_once(state: Dict[str, Any]) -> bool:
    """The seed policy applied with no duplicate: per family one rule 1000, one forward rule 999 (``iif
    eth1 ... lookup main``, for ports published by DNAT) and one default route in table 100."""
    priorities = sorted(r.get("priority") for r in state["rules"] if "iif" not in r)
    forward = sorted(r.get("priority") for r in state["rules"] if r.get("iif") == "eth1")
    defaults = [r for r in state["routes"] if r.get("dst") == "default" and str(r.get("table")) == "100"]
    return applied(state) and priorities == [1000, 1000] and forward == [999, 999] and len(defaults) == 2


def wait_state(m: Machine, predicate, timeout: float = 30) -> bool:
    return bool(wait_for(lambda: predicate(ours(m)), timeout, 0.2))


def replies_by_eth1(checks: Checks, seed: Seed, m: Machine) -> bool:
    before = {i: m.netns.counters(i)["tx"] for i in ("eth0", "eth1")}
    ping = seed.ping(Seed.SERVICE4, count=5)
    tcp4, tcp6 = seed.tcp(Seed.SERVICE4), seed.tcp(Seed.SERVICE6)
    sent = {i: m.netns.counters(i)["tx"] - before[i] for i in ("eth0", "eth1")}
    ok = checks.check("ping (5) and TCP 4/6 monitoring host -> eth1 work", ping and tcp4 and tcp6)
    return checks.check(f"replies leave by eth1 (tx packets: eth1 +{sent['eth1']}, eth0 +{sent['eth0']})",
                        sent["eth1"] >= 5 and sent["eth0"] < 5) and ok


def cli(m: Machine, *args: str, user: str = "") -> subprocess.CompletedProcess:
    return m.exec(PACKAGE, *args, user=user or None, check=False)


def service(m: Machine) -> Tuple[str, str]:
    """(ActiveState, MainPID) of the service."""
    out = m.exec("systemctl", "show", "-p", "ActiveState", "-p", "MainPID", PACKAGE).stdout.split()
    props = dict(line.split("=", 1) for line in out if "=" in line)
    return props.get("ActiveState", "?"), props.get("MainPID", "?")


def wait_service(m: Machine, state: str = "active", timeout: float = 30) -> bool:
    return bool(wait_for(lambda: service(m)[0] == state, timeout, 0.2))


# ---- the steps -----------------------------------------------------------------------


def steps(m: Machine, seed: Seed, debs: Dict[str, Tuple[str, str]], checks: Checks) -> None:
    from tests.lab.machinelife import later_steps

    checks.step("3. Booting the machine (systemd as PID 1, NetworkManager, polkitd)")
    m.configure()
    seconds = m.boot()
    checks.check(f"booted in {seconds:.1f} s; systemd {m.exec('systemctl', 'is-system-running', check=False).stdout.strip()}",
                 True)
    nm_version = m.exec("nmcli", "--version").stdout.split()[-1]
    checks.check(f"NetworkManager {nm_version} activated mgmt and service", m.wait_active(["mgmt", "service"]))
    svm0 = m.netns.conf("ipv4", "eth1", "src_valid_mark")
    checks.check("nothing of ours yet; replies to the monitoring host fail",
                 clean(ours(m), svm0) and not seed.ping(Seed.SERVICE4))

    old, new = debs["previous"], debs["current"]
    checks.step(f"4. apt install the previous version {old[0]}, set the seed policy with its CLI")
    install(m, checks, old)
    out = cli(m, "set", "service", *POLICY)
    show(f"$ {PACKAGE} set service {' '.join(POLICY)}", out.stdout + out.stderr)
    checks.check("set exits 0; the running service applied it", out.returncode == 0
                 and wait_state(m, exactly_once))

    checks.step(f"5. Upgrade {old[0]} -> {new[0]} with the connection up; a watcher samples the rule")
    upgrade(m, checks, new)
    later_steps(m, seed, checks, svm0)


def install(m: Machine, checks: Checks, deb: Tuple[str, str]) -> None:
    with open(deb[1], "rb") as handle:
        m.put(f"/root/{os.path.basename(deb[1])}", handle.read())
    out = m.exec("apt-get", "install", "-y", f"/root/{os.path.basename(deb[1])}", check=False, timeout=600)
    checks.check(f"apt-get install {os.path.basename(deb[1])} exits 0", out.returncode == 0)
    if out.returncode:
        show("apt-get said:", (out.stdout + out.stderr)[-3000:])
    version = m.exec("dpkg-query", "-W", "-f=${Version}", PACKAGE, check=False).stdout
    checks.check(f"{PACKAGE} {version} installed; its service runs", version == deb[0] and wait_service(m))


def upgrade(m: Machine, checks: Checks, deb: Tuple[str, str]) -> None:
    pid_before = service(m)[1]
    m.previous_pids.add(pid_before)
    watcher = m.spawn("chrt", "-f", "10", "python3", "-c", WATCHER, "/run/npr-watch.stop")
    try:
        checks.check("the watcher runs in the machine", watcher.stdout.readline().strip() == "ready")
        time.sleep(0.5)
        install(m, checks, deb)
        time.sleep(1)
        m.exec("touch", "/run/npr-watch.stop")
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    try:
        summary = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        checks.check(f"the watcher's summary ({err.strip()[-500:]})", False)
        return
    print(f"  watcher: {summary['samples']} samples in {summary['seconds']:.1f} s, interval median "
          f"{summary['median_ms']:.1f} ms, max {summary['max_ms']:.1f} ms ({summary['over_10ms']} over 10 ms)")
    checks.check(f"rule and route present in all {summary['samples']} samples (missing in {summary['misses']})",
                 summary["misses"] == 0 and summary["samples"] > 100)
    state, pid_after = service(m)
    checks.check(f"the service was restarted by the upgrade (MainPID {pid_before} -> {pid_after})",
                 state == "active" and pid_after != pid_before)
    checks.check("the policy is applied exactly once after the upgrade", exactly_once(ours(m)))
