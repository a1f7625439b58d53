"""The apps key: parsing (with hostile values), the entries it plans, and its pure helpers."""

from __future__ import annotations

import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nm_policy_routing import commands, fib
from nm_policy_routing.adapters.cgroupbpf import program
from nm_policy_routing.errors import PolicyError
from nm_policy_routing.model import App, Rule, SockMark
from nm_policy_routing.planner import plan
from nm_policy_routing.policy import parse_apps, parse_policy
from nm_policy_routing.record import policy_from_json, policy_to_json
from tests.unit.test_planner import conn

KEY = "nm-policy-routing.apps"


def test_parse_every_kind() -> None:
    apps = parse_apps("user:root, uid:1000,unit:backup.service,unit:user-1000.slice,cgroup:/a/b.scope/,uid:1000")
    assert apps == (App("uid", "0", "root"), App("uid", "1000"), App("unit", "backup.service"),
                    App("unit", "user-1000.slice"), App("cgroup", "/a/b.scope"))
    assert [str(a) for a in apps] == ["user:root", "uid:1000", "unit:backup.service", "unit:user-1000.slice",
                                      "cgroup:/a/b.scope"]
    assert parse_apps("") == ()


@pytest.mark.parametrize("bad, why", [
    ("user:no-such-user-npr", "unknown user 'no-such-user-npr'"),
    ("uid:-1", "is not a uid"),
    ("uid:4294967295", "is not a uid"),
    ("uid:١٠٠", "is not a uid"),
    ("uid:1_000", "is not a uid"),
    ("unit:backup", "is not a unit name"),
    ("unit:foo.socket", "is not a unit name"),
    ("unit:../x.service", "is not a unit name"),
    ("cgroup:relative/path", "is not a cgroup path"),
    ("cgroup:/", "is not a cgroup path"),
    ("cgroup:/a/../../etc", "is not a cgroup path"),
    ("cgroup:/a\nb", "is not a cgroup path"),
    ("group:x", "unknown kind"),
    ("root", "is not KIND:VALUE"),
])
def test_bad_values_name_key_and_value(bad: str, why: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy({KEY: bad}, "svc (u1)")
    (problem,) = exc.value.problems
    assert problem.startswith(f"{KEY}=") and why in problem, problem
    assert "accepted: a comma list of user:NAME" in problem


def test_a_huge_value_is_shown_shortened() -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy({KEY: "cgroup:/" + "a/" * 3000 + ".."}, "svc")
    assert len(exc.value.problems[0]) < 600


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_a_value_or_a_policy_error(text: str) -> None:
    try:
        parse_policy({KEY: text}, "svc")
    except PolicyError as exc:
        assert exc.problems and exc.problems[0].startswith(KEY)


def test_user_apps_plan_uid_and_source_rules_without_a_mark() -> None:
    p = plan([conn("u1", "eth1", table="100", priority="1000", match="source", apps="uid:1000")])
    cp = p.connections[0]
    assert cp.allocation.fwmark is None and not cp.state.sockmarks and not cp.state.marks
    assert cp.state.rules == {
        Rule(4, 1000, 100, src="0.0.0.0", src_len=32, uid_start=1000, uid_end=1000),
        Rule(6, 1000, 100, src="fd00:1::2", src_len=128, uid_start=1000, uid_end=1000),
        Rule(4, 1000, 100, src="10.0.1.2", src_len=32),
        Rule(6, 1000, 100, src="fd00:1::2", src_len=128),
    }


def test_unit_apps_get_the_connections_mark_on_their_sockets() -> None:
    p = plan([conn("u1", "eth1", table="100", fwmark="0x10/0xf0", priority="1000",
                   apps="unit:backup.service,cgroup:/jobs")])
    cp = p.connections[0]
    assert cp.state.sockmarks == {SockMark("unit:backup.service", 0x10, 0xF0), SockMark("cgroup:/jobs", 0x10, 0xF0)}
    assert Rule(4, 1000, 100, 0x10, 0xF0) in cp.state.rules
    assert not [r for r in cp.state.rules if r.uid_start >= 0]


def test_a_unit_alone_allocates_a_mark_even_with_match_source() -> None:
    cp = plan([conn("u1", "eth1", match="source", apps="unit:backup.service")]).connections[0]
    assert cp.allocation.fwmark is not None
    assert cp.state.sockmarks == {SockMark("unit:backup.service", cp.allocation.fwmark.value,
                                           cp.allocation.fwmark.mask)}
    assert not cp.state.marks  # no nft marking unless the match asks for it


def test_an_app_listed_by_two_connections_stays_with_the_one_that_holds_it() -> None:
    """Two connections cannot both route one user or unit: the holder keeps it (never evict),
    the newcomer is refused with a message naming both, and is applied once the holder goes."""
    holder = conn("u2", "eth1", apps="unit:backup.service,uid:1000")
    newcomer = conn("u1", "wlan0", n=2, apps="uid:1000,unit:backup.service")
    first = plan([holder]).connections[0]
    p = plan([newcomer, holder], previous={"u2": first.allocation})
    assert p.get("u2").status == "ok" and p.get("u2").state.sockmarks
    refused = p.get("u1")
    assert refused.status == "conflict" and not refused.state.rules and not refused.state.sockmarks
    assert len(refused.errors) == 2 and all("id-eth1" in e and "which keeps it" in e for e in refused.errors)
    assert "uid:1000 is already routed through connection" in refused.errors[0]
    assert "unit:backup.service is already routed through connection" in refused.errors[1]
    assert plan([newcomer]).get("u1").status == "ok"
    other = plan([newcomer, conn("u2", "eth1", apps="uid:1001")])
    assert {cp.status for cp in other.connections} == {"ok"}, "different apps do not clash"


def test_the_record_keeps_apps() -> None:
    policy = parse_policy({"nm-policy-routing.enable": "yes", KEY: "user:root,unit:a.service"})
    assert policy_from_json(policy_to_json(policy)) == policy


def test_commands_and_fib_know_uid_ranges() -> None:
    rule = Rule(4, 1000, 100, src="0.0.0.0", src_len=32, uid_start=7, uid_end=7)
    assert commands.rule("add", rule) == \
        "ip -4 rule add priority 1000 from 0.0.0.0/32 uidrange 7-7 table 100 protocol 214"
    fib_rule = fib.FibRule(1000, 100, src="0.0.0.0/32", uid_start=7, uid_end=7)
    assert fib.rule_matches(fib_rule, fib.Packet("192.0.2.1", uid=7))
    assert not fib.rule_matches(fib_rule, fib.Packet("192.0.2.1", uid=8))
    # a socket whose source is chosen already (an established flow) is not matched
    assert not fib.rule_matches(fib_rule, fib.Packet("192.0.2.1", src="10.0.0.2", uid=7))


def test_the_socket_program_sets_only_the_mask_bits() -> None:
    code = program(0x01000000, 0xFF000000)
    insns = [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]
    assert [i[0] for i in insns] == [0x61, 0x54, 0x44, 0x63, 0xB7, 0x95]
    assert insns[1][3] & 0xFFFFFFFF == 0x00FFFFFF and insns[2][3] == 0x01000000


def test_set_writes_and_removes_the_services_drop_ins(tmp_path, monkeypatch) -> None:
    from nm_policy_routing.adapters import cgroups

    reloads = []
    monkeypatch.setattr(cgroups, "DROPIN_DIR", str(tmp_path))
    monkeypatch.setattr(cgroups, "systemd_booted", lambda: True)
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: reloads.append(args))  # cgroups imports it when used
    done = cgroups.sync_dropins(set(), {"backup.service"}, "/usr/bin/nm-policy-routing")
    dropin = tmp_path / "backup.service.d" / cgroups.DROPIN_NAME
    assert done == [f"wrote {dropin}"] and reloads == [["systemctl", "daemon-reload"]]
    assert "ExecStartPre=+-/usr/bin/nm-policy-routing unit-start %n" in dropin.read_text()
    assert cgroups.sync_dropins({"backup.service"}, {"backup.service"}, "x") == []
    cgroups.sync_dropins({"backup.service"}, set(), "x")
    assert not (tmp_path / "backup.service.d").exists() and len(reloads) == 2
