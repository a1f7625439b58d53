"""The daemon's mirror of NetworkManager's objects (adapters/nmmirror.py): loaded where the
GetManagedObjects reply sits among the signals, kept current by them, and silent (the bus
is asked) for whatever it cannot vouch for."""

from types import SimpleNamespace

from dbus_next import Variant

from nm_policy_routing.adapters.networkmanager import _plain
from nm_policy_routing.adapters.nmfacts import ACTIVE, DEVICE, IP4CONFIG, PROPS
from nm_policy_routing.adapters.nmmirror import OBJECT_MANAGER, ROOT, Mirror
from nm_policy_routing.errors import NetworkManagerError

NM_NAME = ":1.7"
DEV = "/org/freedesktop/NetworkManager/Devices/3"
AC = "/org/freedesktop/NetworkManager/ActiveConnection/3"
CFG = "/org/freedesktop/NetworkManager/IP4Config/3"


def message(sender: str = NM_NAME, reply_serial=None, error_name=None, **fields) -> SimpleNamespace:
    """A message as dbus-next hands it to the message handlers."""
    fields.setdefault("path", ROOT)
    return SimpleNamespace(sender=sender, reply_serial=reply_serial, error_name=error_name, **fields)


def changed(path, interface, values, invalidated=()):
    return message(path=path, interface=PROPS, member="PropertiesChanged",
                   body=[interface, {k: Variant("s", v) if isinstance(v, str) else v for k, v in values.items()},
                         list(invalidated)])


def added(path, interfaces):
    return message(interface=OBJECT_MANAGER, member="InterfacesAdded", body=[path, interfaces])


def loaded(objects=None) -> Mirror:
    mirror = Mirror(_plain)
    mirror.expect(41)
    mirror.on_message(message(reply_serial=41, body=[objects if objects is not None else {
        DEV: {DEVICE: {"Interface": Variant("s", "eth1"), "IpInterface": Variant("s", "eth1"),
                       "ActiveConnection": Variant("o", "/"), "Ip4Config": Variant("o", CFG),
                       "Driver": Variant("s", "veth")},
              DEVICE + ".Statistics": {"RxBytes": Variant("t", 1)}},
        CFG: {IP4CONFIG: {"AddressData": Variant("aa{sv}", []), "Gateway": Variant("s", "")}},
    }]))
    return mirror


def test_not_loaded_it_answers_nothing() -> None:
    mirror = Mirror(_plain)
    assert not mirror.live
    assert mirror.answer(DEV, DEVICE) is None and mirror.device_of("eth1") is None
    mirror.on_message(changed(DEV, DEVICE, {"ActiveConnection": AC}))  # before any snapshot: nothing to apply to
    assert mirror.answer(DEV, DEVICE) is None


def test_the_snapshot_keeps_only_what_is_read() -> None:
    mirror = loaded()
    assert mirror.live and mirror.owner == NM_NAME
    assert mirror.answer(DEV, DEVICE) == {"Interface": "eth1", "IpInterface": "eth1", "ActiveConnection": "/",
                                          "Ip4Config": CFG}
    assert mirror.answer(DEV, DEVICE + ".Statistics") is None  # not kept: the caller asks the bus
    assert mirror.device_of("eth1") == DEV and mirror.device_of("eth9") is None


def test_signals_after_the_snapshot_apply_and_a_gone_object_is_an_error() -> None:
    mirror = loaded()
    mirror.on_message(added(AC, {ACTIVE: {"Uuid": Variant("s", "u-1"), "State": Variant("u", 1),
                                          "Devices": Variant("ao", [DEV]), "Default": Variant("b", False)}}))
    mirror.on_message(changed(DEV, DEVICE, {"ActiveConnection": AC}))
    mirror.on_message(changed(CFG, IP4CONFIG, {"AddressData": Variant("aa{sv}", [
        {"address": Variant("s", "10.0.1.2"), "prefix": Variant("u", 24)}]), "Gateway": "10.0.1.1"}))
    assert mirror.answer(AC, ACTIVE) == {"Uuid": "u-1", "State": 1, "Devices": [DEV]}
    assert mirror.answer(DEV, DEVICE)["ActiveConnection"] == AC
    assert mirror.answer(CFG, IP4CONFIG) == {"AddressData": [{"address": "10.0.1.2", "prefix": 24}],
                                             "Gateway": "10.0.1.1"}
    mirror.on_message(message(interface=OBJECT_MANAGER, member="InterfacesRemoved", body=[AC, [ACTIVE]]))
    gone = mirror.answer(AC, ACTIVE)
    assert isinstance(gone, NetworkManagerError) and AC in str(gone)


def test_signals_before_the_snapshot_are_replaced_by_it() -> None:
    mirror = loaded()
    mirror.expect(42)  # a re-sync's refresh on its way
    mirror.on_message(changed(DEV, DEVICE, {"ActiveConnection": AC}))  # older than the reply that follows
    assert mirror.answer(DEV, DEVICE)["ActiveConnection"] == AC  # the old mirror stays current meanwhile
    mirror.on_message(message(reply_serial=42, body=[{DEV: {DEVICE: {"ActiveConnection": Variant("o", "/")}}}]))
    assert mirror.answer(DEV, DEVICE) == {"ActiveConnection": "/"}
    assert isinstance(mirror.answer(CFG, IP4CONFIG), NetworkManagerError)


def test_another_sender_and_other_replies_change_nothing() -> None:
    mirror = loaded()
    forged = changed(DEV, DEVICE, {"ActiveConnection": AC})
    forged.sender = ":1.99"  # not NetworkManager
    mirror.on_message(forged)
    mirror.on_message(message(reply_serial=7, body=[{}]))  # the reply to another call
    assert mirror.answer(DEV, DEVICE)["ActiveConnection"] == "/"


def test_what_it_cannot_vouch_for_is_asked_over_the_bus() -> None:
    mirror = loaded()
    mirror.on_message(changed(DEV, DEVICE, {}, invalidated=["Ip4Config"]))
    assert mirror.answer(DEV, DEVICE) is None and mirror.device_of("eth1") is None
    mirror.on_message(changed("/org/freedesktop/NetworkManager/Devices/9", DEVICE, {"State": Variant("u", 100)}))
    assert mirror.answer("/org/freedesktop/NetworkManager/Devices/9", DEVICE) is None  # never added: not known
    mirror.expect(43)
    mirror.on_message(message(reply_serial=43, error_name="org.freedesktop.DBus.Error.UnknownMethod", body=["no"]))
    assert not mirror.live and mirror.answer(CFG, IP4CONFIG) is None  # a failed snapshot: the bus for everything
