"""Per-application routing against a real NetworkManager: ``run --via`` and ``apps=user:...``.

Lab: the main default route leaves by eth0 (connection 'mgmt', metric 100); 'service' on
eth1 has a gateway too (metric 500) and the policy. The router drops what comes from eth0's
side towards REMOTE (198.51.100.9): REMOTE is reachable only through eth1's path.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Dict, Iterator, Optional

import pytest

from tests.lab.netns import Lab, Seed, wait_for
from tests.lab.nm import MGMT_UUID, SERVICE_UUID, _connection_group, _user_group
from tests.lab.world import CLI, World

pytestmark = pytest.mark.nm

PEER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "peercheck.py")
PORT = 9100
REMOTE = Seed.REMOTE4
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
#: the CLI in a mount namespace with cgroup2 at /sys/fs/cgroup, as on a systemd machine
#: (`ip netns exec` mounts a fresh /sys, which hides the host's cgroup mounts)
WITH_CGROUP2 = ["sh", "-c", 'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"', "sh"]


def mgmt_default() -> str:
    return (_connection_group("mgmt", MGMT_UUID, "eth0")
            + "\n[ipv4]\nmethod=manual\naddress1=10.0.0.2/24\ngateway=10.0.0.1\nroute-metric=100\n"
            "dad-timeout=0\n\n[ipv6]\nmethod=disabled\n")


def service_backup(user: Dict[str, str]) -> str:
    return (_connection_group("service", SERVICE_UUID, "eth1")
            + "\n[ipv4]\nmethod=manual\naddress1=10.0.1.2/24\ngateway=10.0.1.1\nroute-metric=500\n"
            "dad-timeout=0\n\n[ipv6]\nmethod=disabled\n" + _user_group(user))


@pytest.fixture
def world(lab: Lab) -> Iterator[World]:
    w = World(lab, hook=True)
    server = None
    try:
        w.seed.rtr.sh("nft add table inet apps; "
                      "nft add chain inet apps guard '{ type filter hook forward priority 0; }'; "
                      f"nft add rule inet apps guard iifname r-mgmt ip daddr {REMOTE} counter drop")
        server = subprocess.Popen(["ip", "netns", "exec", w.seed.mon.name, sys.executable, PEER, "serve",
                                   str(PORT)], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        yield w
    finally:
        if server is not None:
            server.kill()
            server.wait()
        w.close()


def connect(world: World, *prefix: str, dst: str = REMOTE, env: Optional[Dict[str, str]] = None):
    """Run the peer client (behind ``prefix``) in the host namespace: its JSON, or None if it failed."""
    proc = world.host.run(*prefix, sys.executable, PEER, "connect", dst, str(PORT), env=env, check=False,
                          timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def run_via(world: World, via: str, *command: str, env: Optional[Dict[str, str]] = None):
    full = dict(world.cli_env(), **(env or {}))
    return world.host.run(*WITH_CGROUP2, CLI, "run", "--via", via, "--", *command, env=full, check=False,
                          timeout=60)


def tx(world: World, iface: str) -> int:
    return world.host.counters(iface)["tx"]


def run_cgroups() -> list:
    return glob.glob("/sys/fs/cgroup/unified/nm-policy-routing-run.*") + \
        glob.glob("/sys/fs/cgroup/nm-policy-routing-run.*")


def bring_up(world: World, user: Dict[str, str]) -> None:
    world.nm.write_keyfile("mgmt", mgmt_default())
    world.nm.write_keyfile("service", service_backup(user))
    world.nm.up("mgmt")
    world.nm.up("service")
    assert world.wait_rules(lambda rules: len(rules) >= 1), world.cli("status").stdout


POLICY = {"nm-policy-routing.enable": "yes"}


def test_run_via_sends_one_command_by_eth1_with_its_address(world: World) -> None:
    bring_up(world, POLICY)
    # started normally, the program goes by eth0 (the main default) and cannot reach REMOTE
    eth0 = tx(world, "eth0")
    assert connect(world) is None
    assert tx(world, "eth0") > eth0
    assert connect(world, dst=Seed.MON4)["seen"] == "10.0.0.2"

    eth1 = tx(world, "eth1")
    proc = run_via(world, "service", sys.executable, PEER, "connect", REMOTE, str(PORT))
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["local"] == answer["seen"] == "10.0.1.2", answer
    assert tx(world, "eth1") > eth1
    assert run_cgroups() == []  # nothing left behind

    # as the sudo caller, with the command's exit code
    proc = run_via(world, "eth1", sys.executable, PEER, "connect", REMOTE, str(PORT),
                   env={"SUDO_UID": "65534", "SUDO_GID": "65534", "SUDO_USER": "nobody"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["uid"] == 65534
    assert run_via(world, "service", "sh", "-c", "exit 7").returncode == 7
    assert run_cgroups() == []

    # refuses clearly: not root, no policy, not active
    proc = world.host.run(*NOBODY, CLI, "run", "--via", "service", "--", "true", env=world.cli_env(), check=False)
    assert proc.returncode == 77 and "sudo" in proc.stderr, proc.stderr
    proc = run_via(world, "mgmt", "true")
    assert proc.returncode == 1 and "mgmt" in proc.stderr and "has no applied policy" in proc.stderr, proc.stderr
    world.nm.down("service")
    proc = run_via(world, "service", "true")
    assert proc.returncode == 1 and "'service' is not active" in proc.stderr, proc.stderr
    assert run_cgroups() == []


def test_user_policy_routes_that_user_only_and_follows_the_connection(world: World) -> None:
    bring_up(world, POLICY)
    hold = subprocess.Popen(["ip", "netns", "exec", world.host.name, *NOBODY, sys.executable, PEER, "hold",
                             Seed.MON4, str(PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(hold.stdout.readline())["seen"] == "10.0.0.2"
        assert connect(world, *NOBODY) is None  # before: nobody goes by eth0 too

        proc = world.cli("set", "service", "apps", "user:nobody")
        assert proc.returncode == 0, proc.stderr
        assert any(r.get("uid_start") == 65534 for r in world.our_rules()), world.our_rules()

        # the established flow is not moved
        hold.stdin.write("\n")
        hold.stdin.flush()
        assert json.loads(hold.stdout.readline()) == {"ok": True, "seen": "10.0.0.2"}

        eth1 = tx(world, "eth1")
        answer = connect(world, *NOBODY)
        assert answer and answer["local"] == answer["seen"] == "10.0.1.2", answer
        assert answer["uid"] == 65534 and tx(world, "eth1") > eth1
        assert connect(world) is None  # root's connections still go by eth0
        assert connect(world, dst=Seed.MON4)["seen"] == "10.0.0.2"
        explained = world.cli("explain", REMOTE, "--uid", "nobody").stdout
        assert "uidrange 65534-65534" in explained and "leaves by eth1" in explained, explained
        proc = world.cli("-v", "status")
        status = proc.stdout
        assert proc.returncode == 0, proc.stderr
        assert "uidrange 65534-65534" in status and "apps: " in status, status
        assert "user:nobody" in world.cli("show", "service").stdout
        assert world.cli("apply", "--dry-run").stdout.strip() == "# nothing to change"
    finally:
        hold.kill()
        hold.wait()

    # down: nothing of it stays in the kernel; up: it applies again
    world.nm.down("service")
    assert wait_for(lambda: world.our_rules() == [] and world.our_routes() == [], timeout=15), world.our_rules()
    assert connect(world, *NOBODY) is None
    world.nm.up("service")
    assert world.wait_rules(lambda rules: any(r.get("uid_start") == 65534 for r in rules))
    answer = connect(world, *NOBODY)
    assert answer and answer["seen"] == "10.0.1.2", answer


def test_removing_the_user_keeps_its_established_flow_on_eth1(world: World) -> None:
    bring_up(world, dict(POLICY, **{"nm-policy-routing.apps": "user:nobody"}))
    hold = subprocess.Popen(["ip", "netns", "exec", world.host.name, *NOBODY, sys.executable, PEER, "hold",
                             REMOTE, str(PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(hold.stdout.readline())["seen"] == "10.0.1.2"
        proc = world.cli("unset", "service", "apps")
        assert proc.returncode == 0, proc.stderr
        assert not any("uid_start" in r for r in world.our_rules())
        assert connect(world, *NOBODY) is None  # new connections: by eth0 again
        hold.stdin.write("\n")
        hold.stdin.flush()
        assert json.loads(hold.stdout.readline()) == {"ok": True, "seen": "10.0.1.2"}
    finally:
        hold.kill()
        hold.wait()


def test_bad_apps_values_install_nothing(world: World) -> None:
    world.nm.write_keyfile("mgmt", mgmt_default())
    world.nm.write_keyfile("service", service_backup(POLICY))
    world.nm.up("mgmt")
    world.nm.up("service")
    assert world.wait_rules(lambda rules: len(rules) >= 1)
    for bad in ("user:no-such-user-npr", "unit:backup", "cgroup:/../../etc", "uid:-1", "user:x,y"):
        proc = world.cli("set", "service", "apps", bad)
        assert proc.returncode == 65, (bad, proc.stderr)
        assert "nm-policy-routing.apps" in proc.stderr and "nothing was changed" in proc.stderr, proc.stderr
    assert not any("uid_start" in r for r in world.our_rules())
    # written behind our back, through NetworkManager: the connection's policy is an error, nothing installed
    assert world.set_user_data_unchecked(SERVICE_UUID, dict(POLICY, **{"nm-policy-routing.apps": "user:ghost-npr"}))
    assert world.cli("apply").returncode == 65
    assert wait_for(lambda: world.our_rules() == [], timeout=15), world.our_rules()
    assert "unknown user 'ghost-npr'" in world.cli("status").stdout
