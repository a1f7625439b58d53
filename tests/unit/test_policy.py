"""The policy model: user data -> a validated policy, or every problem with key, value, forms."""

from __future__ import annotations

import pytest

from nm_policy_routing.errors import PolicyError
from nm_policy_routing.model import ExtraRoute, Fwmark
from nm_policy_routing.policy import parse_policy

P = "nm-policy-routing."


def parse(**keys: str):
    return parse_policy({P + k.replace("_", "-"): v for k, v in keys.items()}, "conn-x")


def test_defaults_when_no_keys() -> None:
    policy = parse_policy({}, "c")
    assert policy.enable is False
    assert policy.table is None and policy.fwmark is None and policy.priority is None
    assert policy.match == {"incoming"}
    assert policy.src_valid_mark is True
    assert policy.rp_filter == "keep" and policy.family == "both" and policy.routes == ()


def test_full_policy() -> None:
    policy = parse(enable="yes", table="0x64", fwmark="0x100/0xff00", priority="1000",
                   match="incoming, source,outgoing", src_valid_mark="no", rp_filter="loose",
                   family="ipv4", routes="10.9.0.0/16 via 10.0.1.254, 192.0.2.0/24")
    assert policy.enable and policy.table == 100 and policy.priority == 1000
    assert policy.fwmark == Fwmark(0x100, 0xFF00)
    assert policy.match == {"incoming", "source", "outgoing"}
    assert not policy.src_valid_mark and policy.rp_filter == "loose" and policy.family == "ipv4"
    assert policy.routes == (ExtraRoute("10.9.0.0/16", "10.0.1.254"), ExtraRoute("192.0.2.0/24"))


@pytest.mark.parametrize("text,value", [("yes", True), ("TRUE", True), ("1", True), ("on", True),
                                        ("no", False), ("false", False), ("0", False), ("Off", False)])
def test_booleans(text: str, value: bool) -> None:
    assert parse(enable=text).enable is value


def test_fwmark_without_mask_is_exact() -> None:
    assert parse(fwmark="1").fwmark == Fwmark(1, 0xFFFFFFFF)


def test_foreign_user_keys_are_ignored() -> None:
    assert parse_policy({"other.app": "x", P + "enable": "yes"}, "c").enable


INVALID = [
    # (key, value, words the message must contain)
    ("enable", "yess", "yes/no"),
    ("enable", "", "yes/no"),
    ("enable", " yes", "yes/no"),
    ("enable", "2", "yes/no"),
    ("table", "0", "1-4294967295"),
    ("table", "253", "reserved"),
    ("table", "254", "reserved"),
    ("table", "255", "reserved"),
    ("table", "4294967296", "out of range"),
    ("table", "-1", "not a number"),
    ("table", "1_000", "not a number"),
    ("table", "١٠٠", "not a number"),
    ("table", "１００", "not a number"),
    ("table", " 100", "not a number"),
    ("table", "100 ", "not a number"),
    ("table", "10\n0", "not a number"),
    ("table", "0100", "not a number"),
    ("table", "1e3", "not a number"),
    ("table", "0x", "not a number"),
    ("table", "0x1ffffffff", "not a number"),
    ("table", "9" * 10000, "10000 characters"),
    ("table", "100; rm -rf /", "not a number"),
    ("table", "$(reboot)", "not a number"),
    ("fwmark", "0", "out of range"),
    ("fwmark", "0/0xff", "out of range"),
    ("fwmark", "0x1/0", "out of range"),
    ("fwmark", "0x3/0x1", "outside MASK"),
    ("fwmark", "0x100/0xff", "outside MASK"),
    ("fwmark", "0x1/", "not a number"),
    ("fwmark", "/0xff", "not a number"),
    ("fwmark", "0x1/0xff/0xff", "not a number"),
    ("fwmark", "0x100000000", "not a number"),
    ("fwmark", "0xg", "not a number"),
    ("fwmark", "`id`", "not a number"),
    ("priority", "0", "out of range"),
    ("priority", "32766", "out of range"),
    ("priority", "32767", "out of range"),
    ("priority", "99999", "out of range"),
    ("priority", "1.5", "not a number"),
    ("priority", "٣", "not a number"),
    ("match", "", "incoming, source, outgoing"),
    ("match", "incomming", "incoming, source, outgoing"),
    ("match", "incoming,", "incoming, source, outgoing"),
    ("match", "incoming;source", "incoming, source, outgoing"),
    ("match", "INCOMING\x00", "incoming, source, outgoing"),
    ("src-valid-mark", "maybe", "yes/no"),
    ("rp-filter", "1", "keep, off, strict or loose"),
    ("rp-filter", "strict\t", "keep, off, strict or loose"),
    ("family", "inet", "ipv4, ipv6 or both"),
    ("family", "ipv4,ipv6", "ipv4, ipv6 or both"),
    ("routes", "10.0.0.1/8", "host bits"),
    ("routes", "10.0.0.0/33", "PREFIX"),
    ("routes", "10.0.0.0/8 via", "PREFIX"),
    ("routes", "10.0.0.0/8 gw 10.0.0.1", "PREFIX"),
    ("routes", "10.0.0.0/8 via fd00::1", "gateway family"),
    ("routes", "fe80::/64%eth0", "PREFIX"),
    ("routes", "../../etc/passwd", "PREFIX"),
    ("routes", "10.0.0.0/8 via 10.0.0.1 dev eth0", "PREFIX"),
    ("routes", ",".join(["10.0.0.0/8"] * 65), "too many"),
    ("routes", "١٠.0.0.0/8", "PREFIX"),
]


@pytest.mark.parametrize("key,value,words", INVALID)
def test_invalid_values_are_reported_with_key_value_and_forms(key: str, value: str, words: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy({P + key: value, P + "enable": "yes" if key != "enable" else value}, "conn-x")
    message = str(caught.value)
    assert "conn-x" in message
    assert P + key in message
    assert words in message
    assert "accepted:" in message
    shown = repr(value if len(value) <= 60 else value[:60] + "...")
    assert shown in message


def test_at_least_forty_invalid_values_are_covered() -> None:
    assert len(INVALID) >= 40


def test_unknown_key_has_did_you_mean() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy({P + "tabel": "100", P + "enable": "yes"}, "eth1-profile")
    message = str(caught.value)
    assert "unknown key 'nm-policy-routing.tabel'" in message
    assert "did you mean 'nm-policy-routing.table'" in message


def test_key_differing_in_case_is_an_error() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy({"nm-policy-routing.Enable": "yes"}, "c")
    assert "only in case" in str(caught.value)
    with pytest.raises(PolicyError):
        parse_policy({"NM-Policy-Routing.enable": "yes"}, "c")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(PolicyError) as caught:
        parse(enable="y", table="253", fwmark="0", priority="x", family="v4", tabel="1")
    assert len(caught.value.problems) == 6


def test_defaults_apply_and_profile_keys_win() -> None:
    policy = parse_policy({P + "table": "200"}, "c", defaults={"enable": "yes", "table": "100"})
    assert policy.enable and policy.table == 200


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEY_TEXT = st.one_of(st.sampled_from([P + k for k in ("enable", "table", "fwmark", "priority", "match",
                                                      "src-valid-mark", "rp-filter", "family", "routes")]),
                     st.text(max_size=40).map(lambda t: P + t), st.text(max_size=40))


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(KEY_TEXT, st.text(max_size=80), max_size=10))
def test_arbitrary_user_data_yields_a_policy_or_policy_error(user) -> None:
    try:
        parse_policy(user, "fuzz")
    except PolicyError as exc:
        assert exc.problems and all(isinstance(p, str) for p in exc.problems)
