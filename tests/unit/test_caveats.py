"""Pure: reading foreign mark writers and early reverse-path filters from a ruleset (JSON as
nft 1.0.6 prints it), and the caveats status shows for them."""

from __future__ import annotations

from nm_policy_routing import nftjson
from nm_policy_routing.caveats import caveats
from nm_policy_routing.model import Address, Connection, ForeignUsage, Fwmark
from nm_policy_routing.planner import plan

U32 = 0xFFFFFFFF
MARK = {"meta": {"key": "mark"}}
CT = {"ct": {"key": "mark"}}


def rule(family: str, table: str, chain: str, *expr) -> dict:
    return {"rule": {"family": family, "table": table, "chain": chain, "expr": list(expr)}}


def mangle(key: dict, value) -> dict:
    return {"mangle": {"key": key, "value": value}}


RULESET = {"nftables": [
    {"chain": {"family": "inet", "table": "firewalld", "name": "filter_PREROUTING", "type": "filter",
               "hook": "prerouting", "prio": -290}},
    rule("inet", "firewalld", "filter_PREROUTING",
         {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}},
         {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "mark", "iif"]}},
                    "right": False}}, {"drop": None}),
    {"chain": {"family": "ip6", "table": "other", "name": "pre", "type": "filter", "hook": "prerouting",
               "prio": -200}},
    rule("ip6", "other", "pre", {"jump": {"target": "rpf"}}),
    rule("ip6", "other", "rpf", {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}},
                                           "right": False}}, {"drop": None}),
    rule("ip6", "other", "late", {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}},
                                            "right": False}}, {"drop": None}),
    # verdict maps reach chains too: an anonymous one and a named one (nft 1.0.6's JSON)
    {"map": {"family": "ip6", "name": "rpmap", "table": "vm", "type": "ifname", "map": "verdict",
             "elem": [["eth1", {"jump": {"target": "rpf2"}}]]}},
    {"chain": {"family": "ip6", "table": "vm", "name": "pre", "type": "filter", "hook": "prerouting",
               "prio": -200}},
    rule("ip6", "vm", "pre", {"vmap": {"key": {"meta": {"key": "iifname"}},
                                       "data": {"set": [["lo", {"accept": None}], ["eth0", {"goto": {"target": "rpf"}}]]}}}),
    rule("ip6", "vm", "pre", {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@rpmap"}}),
    rule("ip6", "vm", "rpf", {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}},
                                        "right": False}}, {"drop": None}),
    rule("ip6", "vm", "rpf2", {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}},
                                         "right": False}}, {"drop": None}),
    rule("inet", "t", "c", mangle(MARK, 0x100)),
    rule("inet", "t", "c", mangle(MARK, CT)),
    rule("inet", "t", "c", mangle(MARK, {"|": [{"&": [MARK, 0xFFFF00FF]}, 0x100]})),
    rule("inet", "t", "c", mangle(CT, {"|": [CT, 0x4000]})),
    rule("ip", "mangle", "PREROUTING", {"counter": None}, {"xt": {"type": "target", "name": "MARK"}}),
    rule("ip", "filter", "INPUT", {"xt": {"type": "match", "name": "addrtype"}}, {"accept": None}),
    rule("inet", "nm_policy_routing", "set_x", mangle(MARK, 0x1)),  # ours: never foreign
]}


def test_foreign_marks_and_writers() -> None:
    assert nftjson.foreign_marks(RULESET) == [
        (Fwmark(0x100, U32), "nft table inet t (chain c)"),
        (Fwmark(-1, 0xFF00), "nft table inet t (chain c)"),
        (Fwmark(-1, 0x4000), "nft table inet t (chain c)"),
    ]
    assert nftjson.all_bit_writers(RULESET) == [
        "nft table inet t (chain c): meta mark set 0x100",
        "nft table inet t (chain c): meta mark set ct mark",
        "nft table ip mangle (chain PREROUTING): iptables-nft target MARK (its mask is not visible)",
    ]
    assert nftjson.early_rpfilter(RULESET) == [(6, "firewalld (nft table inet firewalld (chain filter_PREROUTING))"),
                                               (6, "nft table ip6 other (chain rpf)"),
                                               (6, "nft table ip6 vm (chain rpf)"),
                                               (6, "nft table ip6 vm (chain rpf2)")], \
        "a jumped-to chain too, also by an anonymous or a named verdict map; never a chain nothing early reaches"


def _plan(**policy: str):
    user = {f"nm-policy-routing.{k.replace('_', '-')}": v for k, v in {"enable": "yes", **policy}.items()}
    conn = Connection("u1", "svc", "eth1", (Address("10.0.1.2", 24), Address("fd00:1::2", 64)), "10.0.1.1",
                      "fd00:1::1", tuple(sorted(user.items())))
    return plan([conn]).get("u1")


def test_caveats_name_the_cause() -> None:
    foreign = ForeignUsage(mark_writers=("nft table inet t (chain c): meta mark set 0x100",),
                           early_rpfilter=((6, "firewalld"),))
    notes = caveats(_plan(rp_filter="off"), foreign, rp_all=1)
    assert notes[0].startswith("rp-filter=off has no effect on eth1") and "filters strict" in notes[0]
    assert notes[1].startswith("IPv6 packets arriving on eth1") and "firewalld" in notes[1]
    assert "can be overwritten by nft table inet t (chain c): meta mark set 0x100" in notes[2]
    assert len(notes) == 3
    assert caveats(_plan(rp_filter="loose"), ForeignUsage(), rp_all=1) == []
    assert caveats(_plan(match="source", rp_filter="strict"), foreign, rp_all=1) == [], \
        "source rules need no mark: neither the filter nor the writers void them"
