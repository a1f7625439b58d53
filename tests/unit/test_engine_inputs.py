"""Inputs as hosts give them: addresses sharing a prefix, odd interface names, a damaged
record, tentative addresses, one family refused (pure, or with a kernel held in memory)."""

from __future__ import annotations

import json
from nm_policy_routing.model import replace

from nm_policy_routing.errors import KernelError
from nm_policy_routing.model import Address, Route
from nm_policy_routing.planner import plan
from nm_policy_routing.record import Record, damage
from tests.unit.test_planner import conn
from tests.unit.test_reconcile import _FakeKernel


def _routes(p, uuid="u1"):
    return sorted(p.get(uuid).state.routes)


def test_addresses_sharing_a_prefix_give_one_route_per_destination() -> None:
    c = conn("u1", "eth1", table="100", match="incoming,source")
    c = replace(c, addresses=c.addresses + (Address("10.0.1.3", 24), Address("fd00:1::5054:ff:fe00:1", 64),
                                            Address("fd00:1::a1b2:c3d4:e5f6:789", 64)))
    p = plan([c])
    routes = _routes(p)
    keys = [(r.family, r.table, r.dst) for r in routes]
    assert len(keys) == len(set(keys)), routes
    assert Route(4, 100, "10.0.1.0/24", "eth1", None, "10.0.1.2") in routes
    assert Route(6, 100, "fd00:1::/64", "eth1", None, "fd00:1::2") in routes
    assert len([r for r in p.get("u1").state.rules if r.src]) == 5, "one source rule per address"


def test_interface_names_nft_reads_otherwise_are_refused_alone() -> None:
    p = plan([conn("u1", "x*", n=1), conn("u2", "eth2", n=2), conn("u3", "a\\b", n=3),
              conn("u4", "@s", n=4), conn("u5", "y*", n=5, match="source")])
    assert p.get("u2").status == "ok"
    for uuid, name in (("u1", "x*"), ("u3", "a\\b"), ("u4", "@s")):
        assert p.get(uuid).status == "conflict"
        assert repr(name) in p.get(uuid).errors[0] and "rename the interface" in p.get(uuid).errors[0]
    assert p.get("u5").status == "ok", "no marking, no nft: the name does not matter"


def test_damage_names_what_is_wrong() -> None:
    good = {"version": 1, "connections": {}, "allocations": {"u": {"table": 100, "priority": 1000,
                                                                   "fwmark": [1, 0xFFFFFFFF]}}}
    assert damage(good) is None
    assert "connections" in damage(dict(good, connections=[1]))
    assert "allocations" in damage(dict(good, allocations={"u": {"table": 254, "priority": 10}}))
    assert "allocations" in damage(dict(good, allocations={"u": {"table": "100", "priority": 10}}))
    assert "sysctls" in damage(dict(good, sysctls={"ipv4/eth1/rp_filter": "1"}))
    assert "version" in damage(dict(good, version=2))
    policy = {"enable": True, "table": None, "priority": 0, "fwmark": None, "match": ["incoming"],
              "src_valid_mark": True, "rp_filter": "keep", "family": "both", "routes": []}
    assert "policies" in damage(dict(good, policies={"k": policy}))
    assert damage(dict(good, policies={"k": dict(policy, priority=None)})) is None


def test_a_damaged_record_is_set_aside_at_the_first_write(tmp_path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "connections": {"u": {"uuid": 5}}, "outcomes": 3}))
    record = Record.load(str(tmp_path))
    assert record.damaged and record.connections() == {}
    assert path.exists(), "reading alone changes nothing"
    record.save()
    aside = list(tmp_path.glob("state.json.damaged-*"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["outcomes"] == 3
    assert Record.load(str(tmp_path)).damaged is None


class _Dad(_FakeKernel):
    """IPv6 address tentative; nft and sysctls take everything."""

    def unusable_addresses(self, iface=None):
        return {"fd00:1::2"}

    def set_marks(self, marks):
        self.state = replace(self.state, marks=frozenset(marks))

    def read_sysctl(self, family, iface, key):
        return next((s.value for s in self.state.sysctls if s.slot == (family, iface, key)), 0)

    def write_sysctl(self, entry):
        others = frozenset(s for s in self.state.sysctls if s.slot != entry.slot)
        self.state = replace(self.state, sysctls=others | {entry})


def test_a_tentative_address_is_left_out_and_ipv4_applies(tmp_path) -> None:
    from nm_policy_routing.reconcile import Engine

    kernel = _Dad()
    result = Engine(str(tmp_path), kernel_factory=lambda: kernel).reconcile([conn("a", "eth1")])
    assert result.plan_of("a").status == "ok" and not result.plan_of("a").errors
    assert result.waiting == {"a": ["fd00:1::2"]}
    assert {r.family for r in kernel.state.routes} == {4} and {r.family for r in kernel.state.rules} == {4}
    assert Record.load(str(tmp_path)).connections()["a"].addresses == conn("a", "eth1").addresses, \
        "the record keeps the address: the next reconcile takes it when it is ready"


class _NoSix(_Dad):
    """The kernel refuses every IPv6 route."""

    def unusable_addresses(self, iface=None):
        return set()

    def add_route(self, r):
        if r.family == 6:
            raise KernelError(f"the kernel refused to add {r}: Invalid source address")
        super().add_route(r)


def test_one_family_refused_keeps_the_other(tmp_path) -> None:
    from nm_policy_routing.reconcile import Engine

    kernel = _NoSix()
    result = Engine(str(tmp_path), kernel_factory=lambda: kernel).reconcile([conn("a", "eth1")])
    cp = result.plan_of("a")
    assert cp.status == "ok" and "IPv6" in cp.errors[0] and "Invalid source address" in cp.errors[0]
    assert {r.family for r in kernel.state.routes} == {4} and {r.family for r in kernel.state.rules} == {4}
