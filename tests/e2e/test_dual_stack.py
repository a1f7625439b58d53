"""Dual stack at ``up`` with duplicate address detection on: NetworkManager reports the
connection up while its IPv6 address is still tentative. IPv4 must not wait for it, and the
IPv6 policy must follow by itself (hook alone and daemon)."""

from __future__ import annotations

import glob
import os
import time

import pytest

from tests.lab.netns import Lab, Seed, wait_for
from tests.lab.world import World

pytestmark = pytest.mark.nm

SEED_POLICY = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "100",
               "nm-policy-routing.fwmark": "0x1", "nm-policy-routing.priority": "1000"}


def _tentative(host) -> bool:
    return any(a.get("tentative") for link in host.ipj("-6", "addr", "show", "dev", "eth1")
               for a in link.get("addr_info", []) if a.get("local") == Seed.SERVICE6)


def _seed_rule(world: World, family: str) -> bool:
    return any(r.get("priority") == 1000 and r.get("table") == "100" for r in world.our_rules(family))


def _v6_route(world: World) -> bool:
    return any(r.get("dst") == "default" and r.get("prefsrc") == Seed.SERVICE6
               for r in world.host.ipj("-6", "route", "show", "table", "100"))


def _settles(world: World) -> list:
    out = []
    for pid in os.popen(f"ip netns pids {world.host.name}").read().split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"nm_policy_routing.settle" in handle.read():
                    out.append(pid)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("mode", ["hook", "daemon"])
def test_dual_stack_up_while_ipv6_is_tentative(lab: Lab, mode: str) -> None:
    world = World(lab, hook=mode == "hook")
    try:
        host = world.host
        host.conf("ipv6", "eth1", "accept_dad", 1)  # DAD on, slow enough to see: 8 probes 500 ms apart
        host.conf("ipv6", "eth1", "dad_transmits", 8)
        host.sysctl("net.ipv6.neigh.eth1.retrans_time_ms", 500)
        if mode == "daemon":
            world.start_daemon()
        world.nm.seed_keyfiles(user_service=SEED_POLICY)  # ipv6.may-fail defaults to yes
        world.nm.up("mgmt")
        world.nm.up("service")
        assert _tentative(host), "the scenario: NetworkManager says up while IPv6 is still tentative"
        seen, lost = {}, []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(seen) < 3 or time.monotonic() < seen["v6"] + 2):
            v4 = _seed_rule(world, "-4")
            if "v4" in seen and not v4:
                lost.append(time.monotonic())
            for name, ok in (("v4", v4), ("dad", not _tentative(host)),
                             ("v6", _seed_rule(world, "-6") and _v6_route(world))):
                if name not in seen and ok:
                    seen[name] = time.monotonic()
            time.sleep(0.05)
        assert "v4" in seen and "v6" in seen, f"converged: {sorted(seen)} {world.daemon_tail()}"
        assert not lost, f"the IPv4 policy was taken down meanwhile: {world.daemon_tail()}"
        assert seen["v4"] < seen["dad"], "IPv4's policy does not wait for IPv6's duplicate address detection"
        assert seen["v6"] - seen["dad"] < 10, "the IPv6 policy follows within seconds"
        assert wait_for(lambda: Seed.tcp(world.seed, Seed.SERVICE4), timeout=5)
        assert Seed.tcp(world.seed, Seed.SERVICE6)
        assert wait_for(lambda: not _settles(world), timeout=10), "no process is left behind"
        assert not glob.glob(os.path.join(world.state_dir, "settle-*")), "nor its lock file"
        if mode == "hook":
            world.nm.down("service")
            assert wait_for(lambda: not world.our_rules("-4") and not world.our_rules("-6"), timeout=15)
    finally:
        world.close()


def test_daemon_does_not_loop_on_its_own_deletions(lab: Lab) -> None:
    """IPv6's part fails half-way (an extra route whose gateway is unreachable) and is taken
    back: the daemon sees its own deletions and must not re-sync over and over."""
    world = World(lab, hook=False)
    try:
        world.start_daemon()
        policy = dict(SEED_POLICY, **{"nm-policy-routing.routes": "fd00:77::/64 via fd00:5::1"})
        world.nm.seed_keyfiles(user_service=policy)
        world.nm.up("mgmt")
        world.nm.up("service")
        assert wait_for(lambda: _seed_rule(world, "-4"), timeout=15), world.daemon_tail()
        time.sleep(2)
        before = world.daemon_tail(100000).count("part of its policy was not installed")
        time.sleep(5)
        after = world.daemon_tail(100000).count("part of its policy was not installed")
        assert after - before <= 1, f"{after - before} re-syncs in 5 s: {world.daemon_tail()}"
        assert _seed_rule(world, "-4") and not _seed_rule(world, "-6")
        assert Seed.tcp(world.seed, Seed.SERVICE4)
    finally:
        world.close()


def test_hook_wait_ends_when_the_connection_goes_down(lab: Lab) -> None:
    """The connection goes down while its IPv6 address is still tentative: the detached wait
    installs nothing and ends."""
    world = World(lab, hook=True)
    try:
        host = world.host
        host.conf("ipv6", "eth1", "accept_dad", 1)  # about 10 s of duplicate address detection
        host.conf("ipv6", "eth1", "dad_transmits", 10)
        host.sysctl("net.ipv6.neigh.eth1.retrans_time_ms", 1000)
        world.nm.seed_keyfiles(user_service=SEED_POLICY)
        world.nm.up("mgmt")
        world.nm.up("service")
        assert _tentative(host) and wait_for(lambda: _seed_rule(world, "-4"), timeout=10)
        assert wait_for(lambda: _settles(world), timeout=5), "a wait was started"
        world.nm.down("service")
        assert wait_for(lambda: not _settles(world), timeout=5), "the wait ends with the connection"
        assert not glob.glob(os.path.join(world.state_dir, "settle-*")), "its lock file goes with it"
        assert not world.our_rules("-4") and not world.our_rules("-6") and not world.our_routes("-6")
        time.sleep(1)
        assert not world.our_rules("-6"), "nothing comes back"
    finally:
        world.close()
