"""``./run machine-test`` step: per-application routing on the booted machine (systemd, unified cgroup2).

The connection 'service' (eth1) has the seed policy; the monitoring host (10.0.9.2) is
reached by eth0 (mgmt's route). A unit listed in ``apps`` and a command started with
``run --via service`` must reach it by eth1 with eth1's address (the monitoring host's
server says which address it saw; eth1's counter rises); a unit not listed must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional

from tests.lab.demo import show
from tests.lab.machine import Machine
from tests.lab.machinesteps import Checks, cli
from tests.lab.netns import Seed, wait_for

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peercheck.py")
PORT = 9100
UNITS = ("npr-listed", "npr-other")
# waits for its go file, then connects once and writes what the server saw
UNIT = """[Service]
ExecStart=/bin/sh -c 'while [ ! -e /run/npr-go-%N ]; do sleep 0.1; done; \\
exec python3 /root/peercheck.py connect {dst} {port} > /run/npr-result-%N'
"""


def _result(m: Machine, name: str) -> Optional[Dict[str, Any]]:
    out = m.exec("cat", f"/run/npr-result-{name}", check=False).stdout.strip()
    return json.loads(out) if out else None


def apps_steps(m: Machine, seed: Seed, checks: Checks, title: str) -> None:
    checks.step(title)
    with open(PEER, "rb") as handle:
        m.put("/root/peercheck.py", handle.read())
    for name in UNITS:
        m.put(f"/etc/systemd/system/{name}.service", UNIT.format(dst=Seed.MON4, port=PORT).encode())
    m.exec("systemctl", "daemon-reload")
    server = subprocess.Popen(["ip", "netns", "exec", seed.mon.name, sys.executable, PEER, "serve", str(PORT)],
                              stdout=subprocess.PIPE, text=True)
    try:
        checks.check("the monitoring host's server runs", server.stdout.readline().strip() == "ready")
        _units(m, checks)
        _late_scope(m, checks)
        _late_cgroup(m, checks)
        _run_via(m, checks)
    finally:
        server.kill()
        server.wait()
        m.exec("systemctl", "stop", *UNITS, check=False)
        out = cli(m, "unset", "service", "apps")
        gone = m.exec("systemctl", "cat", "npr-listed.service", check=False).stdout
        checks.check("unset service apps: exit 0, the drop-in removed", out.returncode == 0 and "unit-start" not in gone)


def _units(m: Machine, checks: Checks) -> None:
    m.exec("systemctl", "start", *UNITS)
    out = cli(m, "set", "service", "apps", "unit:npr-listed.service")
    show("$ nm-policy-routing set service apps unit:npr-listed.service", out.stdout + out.stderr)
    checks.check("set service apps unit:npr-listed.service: exit 0, no cgroup warning (unified)",
                 out.returncode == 0 and "cgroup" not in out.stderr)

    def marked() -> bool:
        status = cli(m, "-v", "status").stdout
        return "installed: socket mark" in status and "unit:npr-listed.service" in status
    checks.check("status lists the socket mark installed for unit:npr-listed.service", bool(wait_for(marked, 20, 0.3)))
    status = cli(m, "-v", "status")
    show("$ nm-policy-routing -v status", status.stdout + status.stderr)
    explained = cli(m, "explain", Seed.MON4, "--unit", "npr-listed.service").stdout
    show(f"$ nm-policy-routing explain {Seed.MON4} --unit npr-listed.service", explained)
    checks.check("explain --unit: leaves by eth1", "leaves by eth1" in explained)
    before = m.netns.counters("eth1")["tx"]
    m.exec("touch", *[f"/run/npr-go-{name}" for name in UNITS])
    listed = wait_for(lambda: _result(m, "npr-listed"), 20, 0.2)
    other = wait_for(lambda: _result(m, "npr-other"), 20, 0.2)
    show("what the monitoring host saw", f"npr-listed: {listed}\nnpr-other: {other}")
    checks.check(f"the listed unit leaves by eth1 with eth1's address (eth1 tx +{m.netns.counters('eth1')['tx'] - before})",
                 bool(listed) and listed["local"] == listed["seen"] == "10.0.1.2"
                 and m.netns.counters("eth1")["tx"] > before)
    checks.check("the unit not listed does not (eth0's address)", bool(other) and other["seen"] == "10.0.0.2")
    dropin = m.exec("systemctl", "cat", "npr-listed.service", check=False).stdout
    checks.check("set wrote the service's ExecStartPre drop-in", "unit-start %n" in dropin)
    m.exec("rm", "-f", "/run/npr-result-npr-listed")
    m.exec("systemctl", "restart", "npr-listed.service")  # a new cgroup: marked by its ExecStartPre
    again = wait_for(lambda: _result(m, "npr-listed"), 20, 0.2)
    checks.check(f"restarted (a new cgroup), it still leaves by eth1 with eth1's address: {again}",
                 bool(again) and again["seen"] == "10.0.1.2")


def _late_scope(m: Machine, checks: Checks) -> None:
    """A unit listed before it runs (a scope: it has no ExecStartPre to mark it): the daemon marks
    its sockets when systemd's JobRemoved says it started, not at its next periodic re-sync (60 s),
    also after systemd re-executed itself."""
    def start() -> subprocess.CompletedProcess:
        m.exec("systemctl", "daemon-reexec")  # systemd comes back with another bus name: still followed
        return m.exec("systemd-run", "--scope", "--unit=npr-late", "--", "sh", "-c",
                      f"sleep 1; exec python3 /root/peercheck.py connect {Seed.MON4} {PORT}", check=False)
    _marked_when_it_appears(m, checks, "unit:npr-late.scope", start, "(no such scope yet), a warning that it is "
                            "marked when it starts", "unit npr-late.scope, listed in a policy's apps, started")


def _late_cgroup(m: Machine, checks: Checks) -> None:
    """A cgroup path listed before it exists (made by something other than systemd): the daemon
    marks its sockets when it appears (inotify on its parent), not at its next periodic re-sync."""
    def start() -> subprocess.CompletedProcess:
        try:
            return m.sh("mkdir -p /sys/fs/cgroup/npr-late.d/job && echo $$ > /sys/fs/cgroup/npr-late.d/job/cgroup.procs"
                        f" && sleep 1 && exec python3 /root/peercheck.py connect {Seed.MON4} {PORT}", check=False)
        finally:
            m.sh("rmdir /sys/fs/cgroup/npr-late.d/job /sys/fs/cgroup/npr-late.d", check=False)
    _marked_when_it_appears(m, checks, "cgroup:/npr-late.d/job", start, "(not there yet)",
                            "a cgroup listed in a policy's apps appeared (/sys/fs/cgroup/npr-late.d/job)")


def _marked_when_it_appears(m: Machine, checks: Checks, target: str, start, when_set: str, logged: str) -> None:
    """List ``target`` in service's apps while it does not exist; ``start()`` makes it and, 1 s
    later, connects to the monitoring host from it: by eth1 with eth1's address."""
    out = cli(m, "set", "service", "apps", f"unit:npr-listed.service,{target}")
    show(f"$ nm-policy-routing set service apps unit:npr-listed.service,{target}", out.stdout + out.stderr)
    warned = "when it starts" in out.stderr if target.startswith("unit:") else True
    checks.check(f"set service apps unit:npr-listed.service,{target} {when_set}: exit 0", out.returncode == 0 and warned)
    waiting = wait_for(lambda: f"{target} waits" in cli(m, "status").stdout, 20, 0.3)
    checks.check(f"status: {target} waits for its cgroup", bool(waiting))
    before = m.netns.counters("eth1")["tx"]
    run = start()
    show(f"{target} made; from it 1 s later: peercheck.py connect {Seed.MON4} {PORT}", run.stdout + run.stderr)
    answer = json.loads(run.stdout) if run.returncode == 0 and run.stdout.strip() else {}
    checks.check(f"{target}: its connection 1 s after it appeared leaves by eth1 with eth1's address",
                 answer.get("local") == answer.get("seen") == "10.0.1.2" and m.netns.counters("eth1")["tx"] > before)
    journal = m.exec("journalctl", "-u", "nm-policy-routing", "--no-pager", "-o", "cat", check=False).stdout
    checks.check(f"the daemon's journal: {logged}", logged in journal)


def _run_via(m: Machine, checks: Checks) -> None:
    before = m.netns.counters("eth1")["tx"]
    out = cli(m, "run", "--via", "service", "--", "python3", "/root/peercheck.py", "connect", Seed.MON4, str(PORT))
    show(f"$ nm-policy-routing run --via service -- python3 peercheck.py connect {Seed.MON4} {PORT}",
         out.stdout + out.stderr)
    answer = json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {}
    checks.check("run --via service: leaves by eth1 with eth1's address",
                 answer.get("local") == answer.get("seen") == "10.0.1.2" and m.netns.counters("eth1")["tx"] > before)
    plain = m.exec("python3", "/root/peercheck.py", "connect", Seed.MON4, str(PORT), check=False).stdout
    checks.check("the same command started normally: eth0's address", '"seen": "10.0.0.2"' in plain)
    code = cli(m, "run", "--via", "service", "--", "sh", "-c", "exit 3").returncode
    left = m.sh("ls -d /sys/fs/cgroup/nm-policy-routing-run.* 2>/dev/null; true").stdout.strip()
    checks.check(f"its exit code passes (3: {code}); no cgroup left behind", code == 3 and not left)
