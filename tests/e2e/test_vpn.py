"""A VPN (OpenVPN through network-manager-openvpn) with its own policy, beside the seed's,
and two connections claiming the same priority — hook alone and daemon, real NetworkManager."""

from __future__ import annotations

import json
import os
from typing import Iterator

import pytest

from tests.e2e.test_nm_policy import SEED_POLICY, seed_rule
from tests.lab.netns import Lab, Seed, wait_for
from tests.lab.nm import MGMT_UUID, SERVICE_UUID
from tests.lab.vpn import TUNNEL_CLIENT, VPN_POLICY, VPN_UUID, VpnServer
from tests.lab.world import World

pytestmark = pytest.mark.nm


@pytest.fixture
def world(lab: Lab, request) -> Iterator[World]:
    mode = request.param
    w = World(lab, hook=mode == "hook")
    try:
        if mode == "daemon":
            w.start_daemon()
        yield w
    finally:
        w.close()


@pytest.fixture
def server(lab: Lab, world: World) -> Iterator[VpnServer]:
    srv = VpnServer(lab, world.seed, os.path.join(world.base, "vpn"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def vpn_rule(rules) -> bool:
    return any(r.get("priority") == 1300 and r.get("table") == "300" for r in rules)


def table(world: World, number: str):
    return sorted((r["dst"], r.get("dev"), r.get("gateway"), r.get("prefsrc"))
                  for r in world.our_routes() if str(r.get("table")) == number)


def seed_intact(world: World) -> bool:
    """The seed policy on eth1, as applied: its rule, its table, its marking, and traffic."""
    rules = [(r.get("priority"), r.get("table")) for r in world.our_rules()]
    nft = world.host.run("nft", "list", "table", "inet", "nm_policy_routing", check=False).stdout
    return ((1000, "100") in rules and ("default", "eth1", "10.0.1.1", "10.0.1.2") in table(world, "100")
            and '"eth1"' in nft and world.host.conf("ipv4", "eth1", "src_valid_mark") == 1
            and world.seed.tcp(Seed.SERVICE4))


@pytest.mark.parametrize("world", ["hook", "daemon"], indirect=True)
def test_vpn_policy_answers_over_the_tunnel_and_leaves_the_seed_alone(world: World, server: VpnServer) -> None:
    world.nm.seed_keyfiles(user_service=SEED_POLICY)
    world.nm.up("mgmt")
    before_service = world.policy_state()
    world.nm.up("service")
    assert world.wait_rules(seed_rule), world.daemon_tail()
    assert wait_for(lambda: seed_intact(world), timeout=10)

    # without a policy on the VPN: nothing answers beyond the tunnel
    world.nm.write_keyfile("vpn", server.keyfile())
    before_vpn = world.policy_state()
    world.nm.up("vpn")
    assert not server.ping() and not server.tcp()
    assert seed_intact(world)
    world.nm.down("vpn")
    assert server.tunnel_gone()

    # with the policy: the tunnel gets its own table, marking and src_valid_mark
    world.nm.write_keyfile("vpn", server.keyfile(VPN_POLICY))
    world.nm.up("vpn")
    assert world.wait_rules(vpn_rule), (world.our_rules(), world.daemon_tail(), world.nm.log_tail(
        world.nm.dispatcher_log))
    assert table(world, "300") == [("10.8.0.0/24", "tun0", None, TUNNEL_CLIENT),
                                   ("default", "tun0", None, TUNNEL_CLIENT)]
    assert world.host.conf("ipv4", "tun0", "src_valid_mark") == 1
    sent = world.host.counters("tun0")["tx"]
    assert wait_for(server.ping, timeout=5), world.cli("status").stdout
    assert server.tcp()
    assert world.host.counters("tun0")["tx"] - sent >= 4  # the echo replies and the TCP answers
    assert seed_intact(world) and world.seed.ping(Seed.SERVICE4)
    status = world.cli("status", "--json").stdout
    rows = {r["uuid"]: r for r in json.loads(status)["connections"]}
    assert rows[VPN_UUID]["status"] == "applied" and rows[VPN_UUID]["iface"] == "tun0", status
    assert rows[SERVICE_UUID]["status"] == "applied", status

    # a reconnect (vpn-down, vpn-up) keeps it working
    world.nm.down("vpn")
    assert server.tunnel_gone()
    world.nm.up("vpn")
    assert world.wait_rules(vpn_rule)
    assert wait_for(server.ping, timeout=5) and seed_intact(world)

    # down: exactly what was there before it came up
    world.nm.down("vpn")
    assert wait_for(lambda: world.policy_state() == before_vpn, timeout=15), world.daemon_tail()
    assert seed_intact(world)
    assert server.tunnel_gone()

    # the parent going down takes the VPN down with it: both policies go
    world.nm.up("vpn")
    assert world.wait_rules(vpn_rule)
    world.nm.down("service")
    assert wait_for(lambda: world.policy_state() == before_service, timeout=20), \
        (world.our_rules(), world.daemon_tail())


CLAIMS_1000 = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "200",
               "nm-policy-routing.fwmark": "0x2", "nm-policy-routing.priority": "1000"}


@pytest.mark.parametrize("world", ["hook", "daemon"], indirect=True)
def test_a_second_connection_claiming_the_same_priority_is_refused(world: World) -> None:
    """mgmt's UUID sorts before service's: it used to take the priority and evict the seed."""
    world.nm.seed_keyfiles(user_service=SEED_POLICY, user_mgmt=CLAIMS_1000)
    world.nm.up("service")
    assert world.wait_rules(seed_rule) and wait_for(lambda: seed_intact(world), timeout=10)
    world.nm.up("mgmt")

    def refused():
        out = world.cli("status", "--json").stdout
        rows = {r["uuid"]: r for r in json.loads(out)["connections"]} if out else {}
        return rows.get(MGMT_UUID, {}).get("status") == "conflict" and rows

    rows = wait_for(refused, timeout=15)
    assert rows, (world.cli("status").stdout, world.cli("status").stderr, world.daemon_tail(),
                  world.nm.log_tail(world.nm.dispatcher_log, 60))
    message = rows[MGMT_UUID]["errors"][0]
    assert f"mgmt ({MGMT_UUID})" in message and f"service ({SERVICE_UUID})" in message
    assert "rule priority 1000" in message, message
    assert rows[SERVICE_UUID]["status"] == "applied"
    assert [(r.get("priority"), r.get("table")) for r in world.our_rules()] == [(1000, "100")]
    assert seed_intact(world) and world.seed.ping(Seed.SERVICE4)
    human = world.cli("status").stdout
    assert "conflict" in human and "rule priority 1000" in human, human
    log = world.daemon_tail(200) if world.daemon else world.nm.log_tail(world.nm.dispatcher_log, 400)
    assert message in log, log

    # once the holder goes down, the refused connection gets its policy
    world.nm.down("service")
    assert world.wait_rules(lambda rules: [(r.get("priority"), r.get("table")) for r in rules] == [(1000, "200")]), \
        (world.our_rules(), world.daemon_tail())
