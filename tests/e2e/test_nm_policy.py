"""The policy follows NetworkManager: hook alone, daemon alone, both — against a real NetworkManager."""

from __future__ import annotations

import json
from typing import Iterator

import pytest

from tests.lab.world import World
from tests.lab.netns import Lab, Seed, wait_for
from tests.lab.nm import DHCP_UUID, SERVICE_UUID

pytestmark = pytest.mark.nm

SEED_POLICY = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "100",
               "nm-policy-routing.fwmark": "0x1", "nm-policy-routing.priority": "1000"}


@pytest.fixture
def world(lab: Lab, request) -> Iterator[World]:
    mode = getattr(request, "param", "both")
    w = World(lab, hook=mode in ("hook", "both"))
    try:
        if mode in ("daemon", "both"):
            w.start_daemon()
        yield w
    finally:
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(w.daemon_tail())
        w.close()


def seed_rule(rules) -> bool:
    return any(r.get("priority") == 1000 and r.get("table") == "100" for r in rules)


@pytest.mark.parametrize("world", ["hook", "daemon", "both"], indirect=True)
def test_seed_through_networkmanager(world: World) -> None:
    seed = world.seed
    world.nm.seed_keyfiles(user_service=SEED_POLICY)
    world.nm.up("mgmt")
    baseline = world.policy_state()
    world.nm.up("service")
    assert world.wait_rules(seed_rule), f"no policy after up: {world.daemon_tail()}"
    assert wait_for(lambda: seed.tcp(Seed.SERVICE4), timeout=5)
    assert seed.ping(Seed.SERVICE4)
    assert seed.tcp(Seed.SERVICE6)
    assert world.host.conf("ipv4", "eth1", "src_valid_mark") == 1
    world.nm.down("service")
    assert wait_for(lambda: world.policy_state() == baseline, timeout=15), "not clean after down"
    world.nm.up("service")
    assert world.wait_rules(seed_rule)
    assert len(world.our_rules()) == 1


def test_policy_edit_applies_live(world: World) -> None:
    world.nm.seed_keyfiles(user_service=SEED_POLICY)
    world.nm.up("mgmt")
    world.nm.up("service")
    assert world.wait_rules(seed_rule)
    edited = dict(SEED_POLICY, **{"nm-policy-routing.table": "200", "nm-policy-routing.match": "incoming,source"})
    world.nm.seed_keyfiles(user_service=edited)  # keyfile + nmcli connection reload
    assert world.wait_rules(lambda rules: {r.get("table") for r in rules} == {"200"} and len(rules) == 2), \
        world.daemon_tail()
    assert wait_for(lambda: world.seed.tcp(Seed.SERVICE4), timeout=5)


@pytest.mark.parametrize("world", ["hook", "daemon"], indirect=True)
def test_dhcp_address_change_moves_source_and_rules(world: World) -> None:
    policy = {"nm-policy-routing.enable": "yes", "nm-policy-routing.match": "incoming,source"}
    world.nm.start_dhcp_server("10.0.1.100", "10.0.1.110")
    world.nm.dhcp_keyfile(user=policy)
    world.nm.up(DHCP_UUID)

    def sources():
        return {r["src"] for r in world.our_rules() if r.get("src", "all") != "all"}

    first = wait_for(lambda: sources() or None, timeout=15)
    assert first and all(a.startswith("10.0.1.1") for a in first), first
    new = world.nm.renumber_dhcp("10.0.1.200", "10.0.1.210")
    assert wait_for(lambda: sources() == {new}, timeout=15), (sources(), new, world.daemon_tail())
    defaults = [r for r in world.our_routes() if r["dst"] == "default"]
    assert [r.get("prefsrc") for r in defaults] == [new]


def test_networkmanager_and_daemon_restart_keep_policy_without_duplicates(world: World) -> None:
    world.nm.seed_keyfiles(user_service=SEED_POLICY)
    world.nm.up("mgmt")
    world.nm.up("service")
    assert world.wait_rules(seed_rule)
    applied = world.policy_state()
    world.nm.restart_nm()
    assert wait_for(lambda: world.nm.device_state("eth1") == "connected", timeout=15)
    same = wait_for(lambda: world.policy_state() == applied, timeout=10)
    now = world.policy_state()
    assert same, ({k: (applied[k], now[k]) for k in now if now[k] != applied[k]}, world.daemon_tail())
    assert world.seed.tcp(Seed.SERVICE4)
    world.stop_daemon()
    world.start_daemon()
    assert world.policy_state() == applied
    assert world.seed.tcp(Seed.SERVICE4)


def test_fifty_up_down_cycles_leave_the_kernel_as_before(world: World) -> None:
    world.nm.seed_keyfiles(user_service=SEED_POLICY)
    world.nm.up("mgmt")
    baseline = world.policy_state()
    for _ in range(50):
        world.nm.up("service")
        assert len(world.our_rules()) <= 1 and len(world.our_rules("-6")) <= 1, "a duplicate rule"
        world.nm.down("service")
    assert wait_for(lambda: world.policy_state() == baseline, timeout=15)


@pytest.mark.parametrize("world", ["hook", "daemon"], indirect=True)
def test_invalid_policy_connection_still_comes_up(world: World) -> None:
    bad = dict(SEED_POLICY, **{"nm-policy-routing.table": "253"})
    world.nm.seed_keyfiles(user_service=bad)
    world.nm.up("mgmt")
    world.nm.up("service")  # raises if NetworkManager fails to activate it

    def recorded():
        out = world.cli("status", "--json").stdout
        rows = json.loads(out)["connections"] if out else []
        return [r for r in rows if r["uuid"] == SERVICE_UUID and r["status"] == "error"
                and r["reason"] == "invalid"]

    rows = wait_for(recorded, timeout=15)
    assert rows, world.cli("status").stdout
    assert "nm-policy-routing.table='253'" in rows[0]["errors"][0]
    assert world.our_rules() == [] and not world.has_nft()
    human = world.cli("status").stdout
    assert "error" in human and "253" in human
