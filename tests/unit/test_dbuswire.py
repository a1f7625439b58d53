"""The hook's synchronous D-Bus client: the wire format both ways (dbuswire, checked against
dbus-next's own marshaller), and its connection to a stand-in bus (syncbus): authentication,
calls sent together, error replies, silence, a truncated reply, a bus that is not there."""

from __future__ import annotations

import io
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nm_policy_routing.adapters import dbuswire as wire
from nm_policy_routing.adapters import syncbus
from nm_policy_routing.errors import NetworkManagerError, NotPermittedError
from tests.unit.fakebus import CLOSE, FakeBus, error, reply, signal

V = wire.Variant
ENDIANS = ("<", ">")

# (signature, values to marshal, values unmarshalled: variants plain, structs lists)
CASES = [
    ("y", [255], [255]),
    ("bb", [True, False], [True, False]),
    ("nqiuxt", [-2, 65535, -(2 ** 31), 2 ** 32 - 1, -(2 ** 63), 2 ** 64 - 1],
     [-2, 65535, -(2 ** 31), 2 ** 32 - 1, -(2 ** 63), 2 ** 64 - 1]),
    ("d", [-1.5], [-1.5]),
    ("sog", ["héllo", "/org/freedesktop/NetworkManager/ActiveConnection/7", "a{sv}"],
     ["héllo", "/org/freedesktop/NetworkManager/ActiveConnection/7", "a{sv}"]),
    ("ay", [b"\x00\xffab"], [b"\x00\xffab"]),
    ("ai", [[]], [[]]),
    ("yat", [1, [1, 2]], [1, [1, 2]]),  # the array's padding to 8 counts outside its length
    ("a{sv}", [{"Uuid": V("s", "u-1"), "State": V("u", 2), "Devices": V("ao", ["/d/1", "/d/2"])}],
     [{"Uuid": "u-1", "State": 2, "Devices": ["/d/1", "/d/2"]}]),
    ("a{sa{sv}}", [{"connection": {"id": V("s", "eth")}, "user": {"data": V("a{ss}", {"k.x": "yes"})}}],
     [{"connection": {"id": "eth"}, "user": {"data": {"k.x": "yes"}}}]),
    ("aa{sv}", [[{"address": V("s", "10.0.0.2"), "prefix": V("u", 24)}, {}]],
     [[{"address": "10.0.0.2", "prefix": 24}, {}]]),
    ("(ybs)a(ii)", [[7, True, "x"], [[1, 2], [3, 4]]], [[7, True, "x"], [[1, 2], [3, 4]]]),
    ("v", [V("v", V("(sa{yt})", ["deep", {1: 2 ** 40}]))], [["deep", {1: 2 ** 40}]]),
    ("aau", [[[1, 2], [], [3]]], [[[1, 2], [], [3]]]),
]


@pytest.mark.parametrize("endian", ENDIANS)
@pytest.mark.parametrize("signature,values,plain", CASES)
def test_marshal_then_unmarshal_gives_the_plain_values(signature, values, plain, endian) -> None:
    assert wire.unmarshal(signature, wire.marshal(signature, values, endian), endian) == plain


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=8), st.integers(0, 2 ** 32 - 1), st.booleans(),
                          st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=3)), max_size=5),
       st.sampled_from(ENDIANS))
def test_any_array_of_structs_survives_the_round_trip(items, endian) -> None:
    values = [[list(item) for item in items]]
    assert wire.unmarshal("a(subax)", wire.marshal("a(subax)", values, endian), endian) == values


@pytest.mark.parametrize("endian", ENDIANS)
def test_a_whole_message_round_trip_keeps_its_header(endian) -> None:
    data = wire.method_call(9, "org.freedesktop.NetworkManager", "/org/freedesktop/NetworkManager",
                            "org.freedesktop.DBus.Properties", "GetAll", "s", ["org.freedesktop.NetworkManager"],
                            endian)
    assert wire.message_length(data) == len(data)
    message = wire.parse(data)
    assert (message.type, message.serial, message.body) == (wire.METHOD_CALL, 9, ["org.freedesktop.NetworkManager"])
    assert message.fields == {wire.PATH: "/org/freedesktop/NetworkManager",
                              wire.INTERFACE: "org.freedesktop.DBus.Properties", wire.MEMBER: "GetAll",
                              wire.DESTINATION: "org.freedesktop.NetworkManager", wire.SIGNATURE: "s"}


def test_our_messages_read_by_dbus_next_and_theirs_by_us() -> None:
    """An independent implementation agrees on the bytes: dbus-next reads our messages (both
    byte orders) and we read its (it writes little-endian only)."""
    from dbus_next import Message, Variant
    from dbus_next._private.unmarshaller import Unmarshaller

    body = [{"a": V("as", ["x", "y"]), "b": V("t", 2 ** 40), "c": V("aa{sv}", [{"p": V("u", 24)}])},
            [-3, 7, "z"], b"\x00\x01", True, -0.25]
    for endian in ENDIANS:
        data = wire.method_call(3, "org.x", "/a", "org.x.I", "M", "a{sv}(iqs)aybd", body, endian)
        theirs = Unmarshaller(io.BytesIO(data)).unmarshall()
        assert (theirs.serial, theirs.member, theirs.path, theirs.signature) == (3, "M", "/a", "a{sv}(iqs)aybd")
        assert {k: (v.signature, v.value) for k, v in theirs.body[0].items() if k != "c"} == {
            "a": ("as", ["x", "y"]), "b": ("t", 2 ** 40)}
        assert theirs.body[1:] == [[-3, 7, "z"], b"\x00\x01", True, -0.25]
    data = Message(destination="org.x", path="/a", interface="org.x.I", member="M", signature="a{sv}(iqs)ay",
                   body=[{"a": Variant("as", ["x", "y"]), "b": Variant("t", 2 ** 40)}, [-3, 7, "z"], b"\x01"]
                   )._marshall()
    assert wire.parse(data).body == [{"a": ["x", "y"], "b": 2 ** 40}, [-3, 7, "z"], b"\x01"]


@pytest.mark.parametrize("signature,data", [
    ("s", b"\x05\x00\x00\x00abc"),  # shorter than its length
    ("s", b"\x03\x00\x00\x00abcX"),  # no NUL
    ("ai", b"\x08\x00\x00\x00\x01\x00\x00\x00"),  # an array longer than the data
    ("ai", b"\x06\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00"),  # elements overrun the length
    ("v", b"\x02ii\x00\x00\x00\x00\x01\x00\x00\x00"),  # a variant of two types
    ("u", b"\x01\x00"),
    ("s", b"\x01\x00\x00\x00\xff\x00"),  # not UTF-8
])
def test_bad_bytes_are_malformed_not_a_crash(signature, data) -> None:
    with pytest.raises(wire.Malformed):
        wire.unmarshal(signature, data)


def test_a_truncated_message_is_malformed() -> None:
    data = wire.method_call(1, "d", "/p", "i.f", "M", "s", ["x" * 40])
    with pytest.raises(wire.Malformed, match="truncated"):
        wire.parse(data[:-10])
    with pytest.raises(wire.Malformed):
        wire.message_length(b"X" + data[1:16])  # no endianness mark


@pytest.mark.parametrize("signature", ["a", "(i", "a{s}x", "z", "i)"])
def test_bad_signatures(signature) -> None:
    with pytest.raises(wire.Malformed):
        wire.split(signature)


def test_bus_addresses() -> None:
    assert syncbus.addresses("unix:path=/run/dbus/system_bus_socket") == ["/run/dbus/system_bus_socket"]
    assert syncbus.addresses("tcp:host=x,port=1;unix:abstract=/tmp/dbus-x,guid=ab;unix:path=/a%2cb") == [
        "\0/tmp/dbus-x", "/a,b"]
    assert syncbus.addresses("tcp:host=x,port=1") == []


# ---- the client against a stand-in bus --------------------------------------------------


@pytest.fixture
def bus(tmp_path):
    """``bus(respond, ...)`` starts a FakeBus in tmp_path; all are closed after the test."""
    started = []

    def start(respond, **kw) -> FakeBus:
        fake = FakeBus(str(tmp_path), respond, **kw)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


GET = ("org.freedesktop.NetworkManager", "/org/freedesktop/NetworkManager", "org.freedesktop.DBus.Properties",
       "GetAll", "s", ["org.freedesktop.NetworkManager"])


def test_calls_go_out_together_and_replies_are_matched_by_serial(bus) -> None:
    pending = []

    def respond(call):  # hold the first, answer both (in reverse order) when the second comes
        pending.append(call)
        if len(pending) < 2:
            return None
        first, second = pending
        return signal() + reply(second, "s", ["second"], ">") + reply(first, "a{sv}", [{"n": V("u", 1)}])

    fake = bus(respond)
    with syncbus.WireBus().connect(address=fake.address) as client:
        first, second = client.calls([GET, GET[:3] + ("Other", "", [])])
    assert first == [{"n": 1}] and second == ["second"]
    assert fake.auth == b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n"


def test_error_replies_become_our_errors(bus) -> None:
    def respond(call):
        if call.fields[wire.MEMBER] == "GetAll":
            return error(call, "org.freedesktop.DBus.Error.UnknownObject", "no such object")
        return error(call, "org.freedesktop.NetworkManager.PermissionDenied", "not allowed", ">")

    fake = bus(respond)
    with syncbus.WireBus().connect(address=fake.address) as client:
        unknown, denied = client.calls([GET, GET[:3] + ("Update2", "", [])])
    assert isinstance(unknown, NetworkManagerError)
    assert str(unknown) == ("NetworkManager GetAll on /org/freedesktop/NetworkManager failed: "
                            "org.freedesktop.DBus.Error.UnknownObject: no such object")
    assert isinstance(denied, NotPermittedError) and "refused Update2" in str(denied)


def test_silence_is_an_error_naming_the_call(bus) -> None:
    fake = bus(lambda call: None)
    with syncbus.WireBus().connect(address=fake.address) as client:
        start = time.monotonic()
        with pytest.raises(NetworkManagerError, match=r"org.freedesktop.NetworkManager did not answer GetAll on "
                                                      r"/org/freedesktop/NetworkManager within 0.2 s"):
            client.calls([GET], timeout=0.2)
    assert time.monotonic() - start < 5


def test_a_truncated_reply_and_a_hang_up(bus) -> None:
    calls = []

    fake = bus(lambda call: [reply(call, "s", ["x" * 100])[:-20], CLOSE])
    with syncbus.WireBus().connect(address=fake.address) as client:
        with pytest.raises(NetworkManagerError, match="went away during GetAll"):
            client.calls([GET], timeout=5)


def test_garbage_from_the_bus_is_an_error(bus) -> None:
    fake = bus(lambda call: b"X" * 64)
    with syncbus.WireBus().connect(address=fake.address) as client:
        with pytest.raises(NetworkManagerError, match="malformed message .* GetAll"):
            client.calls([GET], timeout=5)


def test_no_bus_and_a_bus_that_never_answers(bus, tmp_path) -> None:
    with pytest.raises(NetworkManagerError, match="cannot reach the D-Bus system bus"):
        syncbus.WireBus().connect(address=f"unix:path={tmp_path}/nothing")
    with pytest.raises(NetworkManagerError, match="cannot reach the D-Bus system bus"):
        syncbus.WireBus().connect(address="tcp:host=localhost,port=1")
    silent = bus(lambda call: None, auth_answer=None)
    with pytest.raises(NetworkManagerError, match="did not answer within 0.3 s; is dbus-daemon hung"):
        syncbus.WireBus().connect(timeout=0.3, address=silent.address).calls([GET])


def test_the_handshake_goes_out_with_the_first_calls(bus) -> None:
    fake = bus(lambda call: reply(call, "s", ["ok"]))
    client = syncbus.WireBus().connect(address=fake.address)
    assert fake.auth == b"" and client.greeting  # nothing sent yet
    with client:
        assert client.calls([GET]) == [["ok"]] and client.calls([GET, GET]) == [["ok"], ["ok"]]
    assert len(fake.calls) == 3


def test_a_refused_authentication(bus, tmp_path) -> None:
    fake = bus(lambda call: None, auth_answer=b"REJECTED EXTERNAL\r\n")
    with pytest.raises(NetworkManagerError, match="refused to authenticate us"):
        syncbus.WireBus().connect(timeout=2, address=fake.address).calls([GET])


def test_the_system_bus_address_comes_from_the_environment(bus, monkeypatch) -> None:
    fake = bus(lambda call: reply(call, "s", ["ok"]))
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path=/nonexistent;{fake.address}")
    with syncbus.WireBus().connect() as client:
        assert client.calls([GET]) == [["ok"]]
