"""What NetworkManager's objects say about a connection (nmfacts), and that the daemon's async
client and the hook's wire client, answering the same steps, read the same facts."""

from __future__ import annotations

import asyncio
from typing import Any, List

import pytest

from nm_policy_routing.adapters import nmfacts, syncbus
from nm_policy_routing.adapters.networkmanager import NetworkManagerBus
from nm_policy_routing.adapters.nmfacts import ACTIVE, DEVICE, IP4CONFIG, IP6CONFIG, NM, NM_PATH, SETTINGS_CONN
from nm_policy_routing.errors import NetworkManagerError
from nm_policy_routing.model import Address, Connection
from tests.unit.fakebus import FakeBus, Objects, serve_objects

AC = "/org/freedesktop/NetworkManager/ActiveConnection/"
DEV = "/org/freedesktop/NetworkManager/Devices/"
IP4 = "/org/freedesktop/NetworkManager/IP4Config/"
IP6 = "/org/freedesktop/NetworkManager/IP6Config/"
SET = "/org/freedesktop/NetworkManager/Settings/"
POLICY = {"nm-policy-routing.enable": "yes", "other.key": "x"}


def world() -> Objects:
    """eth1 activated with its own IP configuration; eth2 activating (pre-up: only its device has
    one); a VPN on eth1's parent with tun0; lo, external."""
    return {
        (NM_PATH, NM): {"ActiveConnections": [AC + "1", AC + "2", AC + "3", AC + "4"],
                        "Devices": [DEV + "1", DEV + "2", DEV + "3", DEV + "4"]},
        (AC + "1", ACTIVE): {"Uuid": "u-eth1", "Id": "service", "State": 2, "StateFlags": 0, "Type": "802-3-ethernet",
                             "Vpn": False, "Devices": [DEV + "1"], "Ip4Config": IP4 + "1", "Ip6Config": IP6 + "1",
                             "Connection": SET + "1"},
        (AC + "2", ACTIVE): {"Uuid": "u-eth2", "Id": "second", "State": 1, "StateFlags": 0, "Type": "802-3-ethernet",
                             "Vpn": False, "Devices": [DEV + "2"], "Ip4Config": "/", "Ip6Config": "/",
                             "Connection": SET + "2"},
        (AC + "3", ACTIVE): {"Uuid": "u-vpn", "Id": "vpn", "State": 2, "StateFlags": 0, "Type": "vpn", "Vpn": True,
                             "Devices": [DEV + "1"], "Ip4Config": IP4 + "3", "Ip6Config": "/", "Connection": SET + "3"},
        (AC + "4", ACTIVE): {"Uuid": "u-lo", "Id": "lo", "State": 2, "StateFlags": 0x80, "Type": "loopback",
                             "Vpn": False, "Devices": [DEV + "4"], "Ip4Config": "/", "Ip6Config": "/",
                             "Connection": SET + "4"},
        (DEV + "1", DEVICE): {"Interface": "eth1", "IpInterface": "eth1", "Ip4Config": IP4 + "1",
                              "Ip6Config": IP6 + "1"},
        (DEV + "2", DEVICE): {"Interface": "eth2", "IpInterface": "", "Ip4Config": IP4 + "2", "Ip6Config": "/"},
        (DEV + "3", DEVICE): {"Interface": "tun0", "IpInterface": "tun0", "Ip4Config": IP4 + "3", "Ip6Config": "/"},
        (DEV + "4", DEVICE): {"Interface": "lo", "IpInterface": "lo", "Ip4Config": "/", "Ip6Config": "/"},
        (IP4 + "1", IP4CONFIG): {"AddressData": [{"address": "10.0.1.2", "prefix": 24}], "Gateway": "10.0.1.1"},
        (IP6 + "1", IP6CONFIG): {"AddressData": [{"address": "fd00:1::2", "prefix": 64}], "Gateway": "::"},
        (IP4 + "2", IP4CONFIG): {"AddressData": [{"address": "10.0.2.2", "prefix": 24}], "Gateway": ""},
        (IP4 + "3", IP4CONFIG): {"AddressData": [{"address": "10.8.0.6", "prefix": 24}], "Gateway": "0.0.0.0"},
        (SET + "1", SETTINGS_CONN): {"connection": {"id": "service"}, "user": {"data": POLICY}},
        (SET + "2", SETTINGS_CONN): {"connection": {"id": "second"}},
        (SET + "3", SETTINGS_CONN): {"connection": {"id": "vpn"}, "user": {"data": {"nm-policy-routing.enable": "no"}}},
        (SET + "4", SETTINGS_CONN): {"connection": {"id": "lo"}},
    }


def run(steps, objects: Objects, rounds: List[List[Any]] = None) -> Any:
    """Answer the steps from ``objects`` (the sans-IO way); ``rounds`` collects each step's requests."""
    answers = None
    while True:
        try:
            requests = steps.send(answers)
        except StopIteration as done:
            return done.value
        if rounds is not None:
            rounds.append(list(requests))
        answers = [objects.get(r, NetworkManagerError(f"no {r[1]} at {r[0]}")) for r in requests]


ETH1 = Connection(uuid="u-eth1", id="service", iface="eth1",
                  addresses=(Address("10.0.1.2", 24), Address("fd00:1::2", 64)), gateway4="10.0.1.1",
                  user_data=tuple(sorted(POLICY.items())), type="802-3-ethernet")


def test_an_activated_connection_and_its_configuration_asked_together() -> None:
    rounds: list = []
    assert run(nmfacts.facts(AC + "1"), world(), rounds) == (ETH1, 2)
    assert rounds == [[(AC + "1", ACTIVE)], [(DEV + "1", DEVICE)],
                      [(IP4 + "1", IP4CONFIG), (IP6 + "1", IP6CONFIG), (SET + "1", SETTINGS_CONN)]]


def test_on_pre_up_the_devices_configuration_only_when_asked() -> None:
    conn, state = run(nmfacts.facts(AC + "2", device_config=True), world())
    assert (conn.iface, conn.addresses, conn.gateway4, conn.user_data, state) == (
        "eth2", (Address("10.0.2.2", 24),), None, (), 1)
    assert run(nmfacts.facts(AC + "2"), world())[0].addresses == ()


def test_a_known_device_is_not_asked_again() -> None:
    rounds: list = []
    assert run(nmfacts.facts(AC + "1", device_config=True, device_hint=DEV + "1"), world(), rounds) == (ETH1, 2)
    assert rounds[0] == [(AC + "1", ACTIVE), (DEV + "1", DEVICE)] and len(rounds) == 2


def test_a_vpn_is_on_the_device_sharing_its_configuration_never_its_parents() -> None:
    conn, _ = run(nmfacts.facts(AC + "3", device_config=True), world())
    assert (conn.iface, conn.addresses, conn.gateway4, conn.user) == (
        "tun0", (Address("10.8.0.6", 24),), None, {"nm-policy-routing.enable": "no"})
    objects = world()
    del objects[(DEV + "3", DEVICE)]  # no device for the tunnel: the event's VPN_IP_IFACE names it
    assert run(nmfacts.facts(AC + "3"), objects)[0].iface == ""


def test_vanished_objects() -> None:
    objects = world()
    assert run(nmfacts.facts(AC + "9"), objects) is None
    del objects[(IP6 + "1", IP6CONFIG)]  # an IP configuration gone meanwhile: no addresses from it
    assert run(nmfacts.facts(AC + "1"), objects)[0].addresses == (Address("10.0.1.2", 24),)
    del objects[(SET + "1", SETTINGS_CONN)]  # the profile unreadable: the facts are too
    with pytest.raises(NetworkManagerError):
        run(nmfacts.facts(AC + "1"), objects)


def test_active_connections_leave_out_external_and_vanished_ones() -> None:
    objects = world()
    objects[(NM_PATH, NM)]["ActiveConnections"].append(AC + "9")
    rounds: list = []
    found = run(nmfacts.active_connections(), objects, rounds)
    assert [c.uuid for c in found] == ["u-eth1", "u-eth2", "u-vpn"]
    assert rounds[1] == [(AC + n, ACTIVE) for n in "12349"]  # every connection's properties at once


def test_one_connections_state_with_or_without_its_facts() -> None:
    rounds: list = []
    assert run(nmfacts.active_state("u-eth2"), world(), rounds) == (1, None)
    assert len(rounds) == 2  # NetworkManager's list, then the connections: no device, no settings
    assert run(nmfacts.active_state("u-eth1", with_facts=True, device_config=True), world()) == (2, ETH1)
    assert run(nmfacts.active_state("u-gone", with_facts=True), world()) == (None, None)


def test_one_connections_facts_take_three_steps_whichever_it_is() -> None:
    """Every device is read with the connections: no step for its device, or for the VPN's."""
    for uuid, path in (("u-eth1", AC + "1"), ("u-eth2", AC + "2"), ("u-vpn", AC + "3")):
        rounds: list = []
        state, conn = run(nmfacts.active_state(uuid, with_facts=True, device_config=True), world(), rounds)
        assert (conn, state) == run(nmfacts.facts(path, device_config=True), world())
        assert len(rounds) == 3, rounds


def test_without_networkmanager_the_steps_raise() -> None:
    with pytest.raises(NetworkManagerError):
        run(nmfacts.active_connections(), {})


# ---- the two drivers ---------------------------------------------------------------------


class _ObjectsBus(NetworkManagerBus):
    """The async client with its calls answered from a dict (what dbus-next would return)."""

    def __init__(self, objects: Objects) -> None:
        super().__init__()
        self.objects = objects

    async def call(self, path, interface, member, signature="", body=None, destination=NM, timeout=10.0):
        key = (path, SETTINGS_CONN if member == "GetSettings" else body[0])
        if key not in self.objects:
            raise NetworkManagerError(f"no {key[1]} at {path}")
        return [self.objects[key]]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_the_async_and_the_wire_client_read_the_same_facts(tmp_path, endian) -> None:
    objects = world()
    steps = [lambda: nmfacts.active_connections(), lambda: nmfacts.facts(AC + "2", device_config=True),
             lambda: nmfacts.facts(AC + "3"), lambda: nmfacts.active_state("u-eth1", True, True),
             lambda: nmfacts.facts(AC + "1", device_hint=DEV + "1")]
    expected = [run(make(), objects) for make in steps]

    async def with_async():
        bus = _ObjectsBus(objects)
        return [await bus.drive(make()) for make in steps]

    fake = FakeBus(str(tmp_path), serve_objects(objects, endian))
    try:
        with syncbus.WireBus().connect(address=fake.address) as bus:
            by_wire = [bus.drive(make()) for make in steps]
    finally:
        fake.close()
    assert asyncio.run(with_async()) == expected
    assert by_wire == expected
    assert expected[0] and expected[3] == (2, ETH1)
