"""The planner: pure, deterministic, collision-free, and isolating bad connections."""

from __future__ import annotations

from typing import Dict

from hypothesis import given, settings
from hypothesis import strategies as st

from nm_policy_routing.model import (
    AUTO_MARK_MASK,
    AUTO_PRIORITY_RANGE,
    AUTO_TABLE_RANGE,
    Address,
    Connection,
    ForeignUsage,
    Fwmark,
    Mark,
    Route,
    Rule,
    Sysctl,
)
from nm_policy_routing.planner import plan

P = "nm-policy-routing."


def conn(uuid: str, iface: str, n: int = 1, **policy: str) -> Connection:
    user = {P + k.replace("_", "-"): v for k, v in policy.items()}
    user.setdefault(P + "enable", "yes")
    return Connection(
        uuid=uuid, id=f"id-{iface}", iface=iface,
        addresses=(Address(f"10.0.{n}.2", 24), Address(f"fd00:{n}::2", 64), Address("fe80::1", 64)),
        gateway4=f"10.0.{n}.1", gateway6=f"fd00:{n}::1",
        user_data=tuple(sorted(user.items())),
    )


def test_seed_plan_has_exactly_the_manual_fix() -> None:
    p = plan([conn("u1", "eth1", table="100", fwmark="0x1", priority="1000")])
    cp = p.get("u1")
    assert cp.status == "ok" and cp.errors == ()
    state = cp.state
    assert state.rules == {Rule(4, 1000, 100, 1, 0xFFFFFFFF), Rule(6, 1000, 100, 1, 0xFFFFFFFF),
                           Rule(4, 999, 254, 1, 0xFFFFFFFF, iif="eth1"), Rule(6, 999, 254, 1, 0xFFFFFFFF, iif="eth1")}
    assert state.routes == {
        Route(4, 100, "0.0.0.0/0", "eth1", "10.0.1.1", "10.0.1.2"),
        Route(4, 100, "10.0.1.0/24", "eth1", None, "10.0.1.2"),
        Route(6, 100, "::/0", "eth1", "fd00:1::1", "fd00:1::2"),
        Route(6, 100, "fd00:1::/64", "eth1", None, "fd00:1::2"),
    }
    assert state.marks == {Mark("incoming", "eth1", 1, 0xFFFFFFFF)}
    assert state.sysctls == {Sysctl("ipv4", "eth1", "src_valid_mark", 1)}


def test_source_and_outgoing() -> None:
    state = plan([conn("u1", "eth1", match="source,outgoing", rp_filter="loose")]).get("u1").state
    srcs = {(r.family, r.src) for r in state.rules if r.src}
    assert srcs == {(4, "10.0.1.2"), (6, "fd00:1::2")}, "link-local addresses get no rule"
    assert {m.direction for m in state.marks} == {"outgoing"}
    assert Sysctl("ipv4", "eth1", "rp_filter", 2) in state.sysctls


def test_source_only_needs_no_mark_and_no_sysctl() -> None:
    cp = plan([conn("u1", "eth1", match="source")]).get("u1")
    assert cp.allocation.fwmark is None
    assert not cp.state.marks and not cp.state.sysctls
    assert all(r.fwmask == 0 for r in cp.state.rules)


def test_family_selection() -> None:
    state = plan([conn("u1", "eth1", family="ipv6")]).get("u1").state
    assert {r.family for r in state.rules} == {6}
    assert not state.sysctls, "src_valid_mark is IPv4 only"


def test_extra_routes_go_to_the_table() -> None:
    state = plan([conn("u1", "eth1", table="100", routes="192.0.2.0/24 via 10.0.1.254")]).get("u1").state
    assert Route(4, 100, "192.0.2.0/24", "eth1", "10.0.1.254", "10.0.1.2") in state.routes


def test_auto_allocation_is_deterministic_and_in_range() -> None:
    conns = [conn(f"uuid-{i}", f"eth{i}", n=i) for i in range(20)]
    first, second = plan(conns), plan(list(reversed(conns)))
    assert first.allocations == second.allocations
    allocs = first.allocations.values()
    assert len({a.table for a in allocs}) == 20
    assert len({a.priority for a in allocs}) == 20
    assert len({a.fwmark for a in allocs}) == 20
    for a in allocs:
        assert AUTO_TABLE_RANGE[0] <= a.table <= AUTO_TABLE_RANGE[1]
        assert AUTO_PRIORITY_RANGE[0] <= a.priority <= AUTO_PRIORITY_RANGE[1]
        assert a.fwmark.mask == AUTO_MARK_MASK and a.fwmark.value & ~AUTO_MARK_MASK == 0


def test_previous_allocation_is_kept_when_others_arrive() -> None:
    alone = plan([conn("b", "eth2", n=2)]).allocations
    crowd = plan([conn(f"a{i}", f"e{i}", n=i + 10) for i in range(30)] + [conn("b", "eth2", n=2)],
                 previous=alone)
    assert crowd.allocations["b"] == alone["b"]


def test_auto_avoids_foreign_tables_priorities_and_marks() -> None:
    first = plan([conn("u1", "eth1")]).allocations["u1"]
    foreign = ForeignUsage(tables=frozenset({first.table}),
                           priorities=frozenset({(6, first.priority)}),
                           marks=((first.fwmark, "someone"),))
    second = plan([conn("u1", "eth1")], foreign=foreign).allocations["u1"]
    assert second.table != first.table and second.priority != first.priority
    assert second.fwmark != first.fwmark


def test_explicit_conflicts_with_foreign_are_refused_with_a_message() -> None:
    foreign = ForeignUsage(tables=frozenset({100}), priorities=frozenset({(4, 1000)}),
                           marks=((Fwmark(-1, 0xF0), "nft table inet fw"),))
    cp = plan([conn("u1", "eth1", table="100", priority="1000", fwmark="0x10/0xf0")], foreign).get("u1")
    assert cp.status == "conflict" and not cp.state
    text = " ".join(cp.errors)
    assert "table 100 already holds routes that are not ours" in text
    assert "priority 1000 already holds rules that are not ours" in text
    assert "nft table inet fw" in text


def test_foreign_exact_mark_elsewhere_is_no_conflict() -> None:
    foreign = ForeignUsage(marks=((Fwmark(0xCA6C, 0xFFFFFFFF), "wg-quick"), (Fwmark(-1, 0xFF00), "mwan3")))
    assert plan([conn("u1", "eth1")], foreign).get("u1").status == "ok"


def test_two_connections_same_explicit_table_second_refused() -> None:
    p = plan([conn("a", "eth1", n=1, table="100"), conn("b", "eth2", n=2, table="100")])
    assert p.get("a").status == "ok"
    assert p.get("b").status == "conflict" and "already used by connection" in p.get("b").errors[0]


def test_invalid_policy_is_isolated() -> None:
    p = plan([conn("a", "eth1", n=1), conn("b", "eth2", n=2, table="253"), conn("c", "eth3", n=3)])
    assert [p.get(u).status for u in "abc"] == ["ok", "invalid", "ok"]
    assert not p.get("b").state
    assert "nm-policy-routing.table='253'" in p.get("b").errors[0]
    assert all(r.table != 253 for r in p.desired.rules)


def test_disabled_and_no_addresses_install_nothing() -> None:
    off = conn("a", "eth1", enable="no")
    bare = Connection("b", "b", "eth2", user_data=((P + "enable", "yes"),))
    p = plan([off, bare])
    assert p.get("a").status == "disabled" and not p.get("a").state
    assert not p.get("b").state


def test_bad_interface_name_is_refused() -> None:
    cp = plan([Connection("a", "a", "../etc", (Address("10.0.0.2", 24),), user_data=((P + "enable", "yes"),))]).get("a")
    assert cp.status == "conflict" and not cp.state


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from([P + k for k in (
    "enable", "table", "fwmark", "priority", "match", "src-valid-mark", "rp-filter", "family", "routes")]),
    st.text(max_size=30)), st.text(max_size=40), max_size=8))
def test_arbitrary_user_data_never_raises(user: Dict[str, str]) -> None:
    c = Connection("u", "c", "eth1", (Address("10.0.1.2", 24),), "10.0.1.1", None, tuple(sorted(user.items())))
    cp = plan([c]).get("u")
    assert cp.status in ("ok", "invalid", "disabled", "conflict")
    if cp.status != "ok":
        assert not cp.state


def test_nft_folded_forms_parse_back() -> None:
    from nm_policy_routing.nftjson import _mangle_mark

    meta = {"meta": {"key": "mark"}}
    full = {"mangle": {"key": meta, "value": {"|": [meta, 0xFF000000]}}}
    assert _mangle_mark(full, "meta") == Fwmark(0xFF000000, 0xFF000000)
    folded = {"mangle": {"key": meta, "value": {"|": [{"&": [meta, 0x01FFFFFF]}, 0x01000000]}}}
    assert _mangle_mark(folded, "meta") == Fwmark(0x01000000, 0xFF000000)

