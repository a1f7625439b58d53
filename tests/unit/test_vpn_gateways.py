"""VPNs, WireGuard and connections without a gateway, below the kernel; and never evicting.

WireGuard has no kernel module on the test machine: its connections are covered here,
from the event environment NetworkManager gives them to the planner's entries.
"""

from __future__ import annotations

from nm_policy_routing.dispatch import facts_from_env
from nm_policy_routing.model import Address, Connection, Route, real_gateway
from nm_policy_routing.planner import plan
from nm_policy_routing.record import connection_from_json, connection_to_json
from tests.unit.test_planner import P, conn

VPN_POLICY = {P + "enable": "yes", P + "table": "300", P + "fwmark": "0x4", P + "priority": "1300"}

#: what NetworkManager 1.42 gave the hook on `vpn-up` of a never-default OpenVPN (lab, captured)
VPN_UP_ENV = {
    "CONNECTION_ID": "vpn", "CONNECTION_UUID": "5e1f0000-0000-4000-8000-0000000000f9",
    "DEVICE_IFACE": "eth1", "DEVICE_IP_IFACE": "eth1",
    "IP4_ADDRESS_0": "10.0.1.2/24 10.0.1.1", "IP4_NUM_ADDRESSES": "1", "IP4_GATEWAY": "10.0.1.1",
    "VPN_IP_IFACE": "tun0", "VPN_IP4_ADDRESS_0": "10.8.0.2/24 0.0.0.0", "VPN_IP4_NUM_ADDRESSES": "1",
    "VPN_IP4_GATEWAY": "0.0.0.0", "VPN_IP4_NUM_ROUTES": "0", "VPN_IP6_GATEWAY": "0.0.0.0",
}

#: a NetworkManager-native WireGuard connection: its own device, addresses, no gateway
WIREGUARD_UP_ENV = {
    "CONNECTION_ID": "wg", "CONNECTION_UUID": "5e1f0000-0000-4000-8000-00000000a9a9",
    "CONNECTION_TYPE": "wireguard", "DEVICE_IFACE": "wg0", "DEVICE_IP_IFACE": "wg0",
    "IP4_ADDRESS_0": "10.44.0.2/24 0.0.0.0", "IP4_NUM_ADDRESSES": "1", "IP4_GATEWAY": "",
    "IP6_ADDRESS_0": "fd44::2/64 ::", "IP6_NUM_ADDRESSES": "1", "IP6_GATEWAY": "::",
}


def test_unspecified_gateways_mean_none() -> None:
    assert [real_gateway(g) for g in ("0.0.0.0", "::", "", None, "junk")] == [None] * 5
    assert real_gateway("10.0.1.1") == "10.0.1.1" and real_gateway("fd00::1") == "fd00::1"


def test_vpn_event_gives_the_tunnel_its_address_and_no_gateway() -> None:
    c = facts_from_env("tun0", VPN_UP_ENV, VPN_POLICY)
    assert (c.iface, c.addresses, c.gateway4, c.gateway6) == ("tun0", (Address("10.8.0.2", 24),), None, None)


def test_never_default_vpn_plans_an_on_link_default_through_the_tunnel() -> None:
    c = facts_from_env("tun0", VPN_UP_ENV, VPN_POLICY)
    cp = plan([c]).get(c.uuid)
    assert cp.status == "ok"
    assert Route(4, 300, "0.0.0.0/0", "tun0", None, "10.8.0.2") in cp.state.routes
    assert Route(4, 300, "10.8.0.0/24", "tun0", None, "10.8.0.2") in cp.state.routes
    assert all(r.oif == "tun0" and r.gateway is None for r in cp.state.routes)
    assert {m.iface for m in cp.state.marks} == {"tun0"}
    assert {s.name for s in cp.state.sysctls} == {"net.ipv4.conf.tun0.src_valid_mark"}


def test_wireguard_connection_gets_its_own_device_and_on_link_defaults() -> None:
    c = facts_from_env("wg0", WIREGUARD_UP_ENV, {P + "enable": "yes"})
    assert (c.iface, c.gateway4, c.gateway6, c.type) == ("wg0", None, None, "wireguard")
    cp = plan([c]).get(c.uuid)
    t = cp.allocation.table
    assert Route(4, t, "0.0.0.0/0", "wg0", None, "10.44.0.2") in cp.state.routes
    assert Route(6, t, "::/0", "wg0", None, "fd44::2") in cp.state.routes


def test_wireguard_from_dbus_shaped_facts_plans_the_same() -> None:
    """NetworkManagerBus.facts gives an empty Gateway as None: the same plan as from the event."""
    from_env = facts_from_env("wg0", WIREGUARD_UP_ENV, {P + "enable": "yes"})
    from_bus = Connection(from_env.uuid, "wg", "wg0", from_env.addresses, real_gateway(""), real_gateway(""),
                          from_env.user_data, "wireguard")
    assert plan([from_bus]).desired == plan([from_env]).desired


def test_a_recorded_0000_gateway_reads_back_as_none() -> None:
    c = facts_from_env("tun0", VPN_UP_ENV, VPN_POLICY)
    data = dict(connection_to_json(c), gateway4="0.0.0.0", gateway6="::")
    assert connection_from_json(data) == c


def test_vpn_on_top_of_a_policy_connection_keeps_both() -> None:
    parent = conn("u-parent", "eth1", table="100", fwmark="0x1", priority="1000")
    vpn = facts_from_env("tun0", dict(VPN_UP_ENV, CONNECTION_UUID="0-sorts-first"), VPN_POLICY)
    p = plan([parent, vpn], previous=plan([parent]).allocations)
    assert p.get("u-parent").status == "ok" and p.get("0-sorts-first").status == "ok"
    assert {m.iface for m in p.desired.marks} == {"eth1", "tun0"}


def test_an_applied_policy_is_never_evicted_by_a_newcomer() -> None:
    """The newcomer's UUID sorts first (it used to win): the incumbent keeps its interface."""
    incumbent = conn("b-incumbent", "eth1", table="100", priority="1000")
    newcomer = conn("a-newcomer", "eth1", table="200", priority="2000")
    before = plan([incumbent])
    p = plan([incumbent, newcomer], previous=before.allocations)
    assert p.get("b-incumbent").state == before.get("b-incumbent").state
    refused = p.get("a-newcomer")
    assert refused.status == "conflict" and not refused.state
    text = refused.errors[0]
    assert "id-eth1 (a-newcomer)" in text and "id-eth1 (b-incumbent)" in text and "interface eth1" in text


def test_a_newcomer_claiming_an_applied_priority_table_or_mark_is_refused() -> None:
    incumbent = conn("z-incumbent", "eth1", n=1, table="100", priority="1000", fwmark="0x1")
    previous = plan([incumbent]).allocations
    for claim, word in ((dict(priority="1000"), "rule priority 1000"), (dict(table="100"), "table 100"),
                        (dict(fwmark="0x1"), "fwmark 0x1")):
        newcomer = conn("a-newcomer", "eth2", n=2, **claim)
        p = plan([incumbent, newcomer], previous=previous)
        assert p.get("z-incumbent").status == "ok", claim
        refused = p.get("a-newcomer")
        assert refused.status == "conflict", claim
        assert word in refused.errors[0] and "z-incumbent" in refused.errors[0] \
            and "a-newcomer" in refused.errors[0], refused.errors


def test_the_refused_newcomer_gets_its_policy_once_the_incumbent_is_gone() -> None:
    incumbent = conn("b-incumbent", "eth1", table="100", priority="1000")
    newcomer = conn("a-newcomer", "eth1", table="200", priority="2000")
    p = plan([newcomer], previous={"b-incumbent": plan([incumbent]).allocations["b-incumbent"]})
    assert p.get("a-newcomer").status == "ok"
