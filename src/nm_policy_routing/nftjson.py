"""Pure builders and parsers for our nftables table, in libnftables JSON.

Layout of ``table inet nm_policy_routing`` (one map lookup per packet per job):

    chain prerouting  (filter, prerouting, mangle)
        ct mark & M vmap @restore_M            # a flow we marked: mark its packets again, done
        iifname vmap @incoming                 # a new flow on a policy interface (*)
    chain output      (route, output, mangle)  # 'route' so a changed mark re-routes
        meta mark & M == 0 ct mark & M vmap @restore_M
        meta mark 0 ct mark & U == 0 oifname vmap @outgoing     (*)

(*) only while a policy of that direction is in place: every packet would make the look-up.
    chain in_V_M:       fib daddr type != local return; then as set_V_M (only flows to this host)
    chain set_V_M:      meta mark and ct mark bits M := V   (others kept)
    chain restore_V_M:  meta mark bits M := V; accept

A packet of a flow already marked costs one map lookup; only a flow's first packets
on a policy interface pay the fib lookup.

M is each mask in use (usually one), U their union. Bits outside M are never
changed. A packet that already carries a mark (its owner's SO_MARK) is never
captured by ``outgoing``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from .model import NFT_TABLE, Fwmark, Mark
from .owners import nft_owner

U32 = 0xFFFFFFFF
FAMILY = "inet"


def _obj(kind: str, **fields: Any) -> Dict[str, Any]:
    return {kind: {"family": FAMILY, "table": NFT_TABLE, **fields}}


def _mark_expr(key: str, value: int, mask: int) -> Dict[str, Any]:
    if mask == U32:
        new: Any = value
    else:
        new = {"|": [{"&": [{key: {"key": "mark"}}, ~mask & U32]}, value]}
    return {"mangle": {"key": {key: {"key": "mark"}}, "value": new}}


def _masked(key: str, mask: int) -> Dict[str, Any]:
    if mask == U32:
        return {key: {"key": "mark"}}
    return {"&": [{key: {"key": "mark"}}, mask]}


def _eq(left: Any, right: Any) -> Dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def set_chain(mark: Fwmark) -> str:
    return f"set_{mark.value:08x}_{mark.mask:08x}"


def in_chain(mark: Fwmark) -> str:
    return f"in_{mark.value:08x}_{mark.mask:08x}"


def restore_chain(mark: Fwmark) -> str:
    return f"restore_{mark.value:08x}_{mark.mask:08x}"


def restore_map(mask: int) -> str:
    return f"restore_{mask:08x}"


def _rule(chain: str, *expr: Dict[str, Any]) -> Dict[str, Any]:
    return _obj("rule", chain=chain, expr=list(expr))


def build(marks: Iterable[Mark]) -> List[Dict[str, Any]]:
    """The commands that create our whole table holding ``marks`` (without the outer wrapper)."""
    marks = sorted(set(marks))
    fwmarks = sorted({Fwmark(m.value, m.mask) for m in marks}, key=lambda f: (f.mask, f.value))
    masks = sorted({f.mask for f in fwmarks})
    union = 0
    for mask in masks:
        union |= mask
    cmds: List[Dict[str, Any]] = [{"add": {"table": {"family": FAMILY, "name": NFT_TABLE}}}]
    add = lambda obj: cmds.append({"add": obj})  # noqa: E731
    incoming = {Fwmark(m.value, m.mask) for m in marks if m.direction == "incoming"}
    for fw in fwmarks:
        both = (_mark_expr("meta", fw.value, fw.mask), _mark_expr("ct", fw.value, fw.mask))
        add(_obj("chain", name=set_chain(fw)))
        add(_rule(set_chain(fw), *both))
        if fw in incoming:
            add(_obj("chain", name=in_chain(fw)))
            add(_rule(in_chain(fw), {"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                                               "right": "local"}}, {"return": None}))
            add(_rule(in_chain(fw), *both))
        add(_obj("chain", name=restore_chain(fw)))
        add(_rule(restore_chain(fw), _mark_expr("meta", fw.value, fw.mask), {"accept": None}))
    for mask in masks:
        add(_obj("map", name=restore_map(mask), type="mark", map="verdict"))
        elems = [[fw.value, {"jump": {"target": restore_chain(fw)}}] for fw in fwmarks if fw.mask == mask]
        add(_obj("element", name=restore_map(mask), elem=elems))
    for direction, chain_of in (("incoming", in_chain), ("outgoing", set_chain)):
        add(_obj("map", name=direction, type="ifname", map="verdict"))
        elems = [[m.iface, {"jump": {"target": chain_of(Fwmark(m.value, m.mask))}}]
                 for m in marks if m.direction == direction]
        if elems:
            add(_obj("element", name=direction, elem=elems))
    add(_obj("chain", name="prerouting", type="filter", hook="prerouting", prio=-150, policy="accept"))
    add(_obj("chain", name="output", type="route", hook="output", prio=-150, policy="accept"))
    for mask in masks:
        add(_rule("prerouting", {"vmap": {"key": _masked("ct", mask), "data": f"@{restore_map(mask)}"}}))
    directions = {m.direction for m in marks}  # a look-up that cannot match is not made (every packet)
    if "incoming" in directions:
        add(_rule("prerouting", {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@incoming"}}))
    for mask in masks:
        add(_rule("output", _eq(_masked("meta", mask), 0),
                  {"vmap": {"key": _masked("ct", mask), "data": f"@{restore_map(mask)}"}}))
    if union and "outgoing" in directions:
        add(_rule("output", _eq({"meta": {"key": "mark"}}, 0), _eq(_masked("ct", union), 0),
                  {"vmap": {"key": {"meta": {"key": "oifname"}}, "data": "@outgoing"}}))
    return cmds


def base_rules(marks: Iterable[Mark]) -> List[Dict[str, Any]]:
    """The commands adding the base chains' rules: they depend only on the masks and the
    directions in use, so they are built from one mark of each (O(masks), not O(marks))."""
    sample: Dict[Tuple[str, int], Mark] = {}
    for mark in marks:
        sample.setdefault((mark.direction, mark.mask), mark)
    return [cmd for cmd in build(sample.values())
            if cmd["add"].get("rule", {}).get("chain") in ("prerouting", "output")]


def replace_table(marks: Iterable[Mark], exists: bool) -> Dict[str, Any]:
    """One transaction: drop our table (if there) and create it anew with ``marks``."""
    cmds: List[Dict[str, Any]] = []
    if exists:
        cmds.append({"delete": {"table": {"family": FAMILY, "name": NFT_TABLE}}})
    cmds.extend(build(marks))
    return {"nftables": cmds}


def delete_table() -> Dict[str, Any]:
    return {"nftables": [{"delete": {"table": {"family": FAMILY, "name": NFT_TABLE}}}]}


# ---- reading back ----------------------------------------------------------


def _mangle_mark(stmt: Dict[str, Any], key: str) -> Optional[Fwmark]:
    """(value, mask) of ``KEY mark set KEY mark & ~M | V`` or ``KEY mark set V``."""
    mangle = stmt.get("mangle")
    if not mangle or mangle.get("key") != {key: {"key": "mark"}}:
        return None
    value = mangle.get("value")
    if isinstance(value, int):
        return Fwmark(value, U32)
    try:
        left, val = value["|"]
        if left == {key: {"key": "mark"}} and isinstance(val, int):
            return Fwmark(val, val)  # "& ~M | V" with V == M: nft keeps only "| V"
        inner, keep = left["&"]
    except (KeyError, TypeError, ValueError):
        return None
    if inner != {key: {"key": "mark"}} or not isinstance(val, int) or not isinstance(keep, int):
        return None
    # nft folds "& ~M | V" into "& (~M | V) | V": the bits forced are ~keep | val
    return Fwmark(val, (~keep | val) & U32)


def parse_table(listing: Dict[str, Any]) -> Tuple[Set[Mark], bool]:
    """Our marks as the kernel holds them, and whether the table's skeleton is intact.

    ``listing`` is the JSON of ``list table inet nm_policy_routing``. Anything we
    cannot recognise makes the table not intact, so reconcile rebuilds it.
    """
    chains: Dict[str, List[List[Dict[str, Any]]]] = {}
    maps: Dict[str, List[Any]] = {}
    base: Dict[str, Tuple[Any, ...]] = {}
    for item in listing.get("nftables", []):
        if "chain" in item:
            chain = item["chain"]
            chains.setdefault(chain["name"], [])
            if "hook" in chain:
                base[chain["name"]] = (chain.get("type"), chain.get("hook"), chain.get("prio"))
        elif "rule" in item:
            rule = item["rule"]
            chains.setdefault(rule["chain"], []).append(rule.get("expr", []))
        elif "map" in item:
            m = item["map"]
            maps[m["name"]] = m.get("elem", [])
    marks: Set[Mark] = set()
    intact = True
    for direction, chain_of in (("incoming", in_chain), ("outgoing", set_chain)):
        for elem in maps.get(direction, []):
            try:
                iface, verdict = elem
                target = verdict["jump"]["target"]
            except (KeyError, TypeError, ValueError):
                intact = False
                continue
            fw = _chain_mark(chains.get(target, [])[-1:], both=True)
            if fw is None or target != chain_of(fw):
                intact = False
                continue
            marks.add(Mark(direction, iface, fw.value, fw.mask))
    expected = parse_expected(marks)
    if base != expected["base"] or {k: len(v) for k, v in chains.items()} != expected["rules"]:
        intact = False
    for name, elems in maps.items():
        if name.startswith("restore_"):
            for elem in elems:
                try:
                    value, verdict = elem
                    fw = _chain_mark(chains.get(verdict["jump"]["target"], []), both=False)
                except (KeyError, TypeError, ValueError):
                    fw = None
                if fw is None or fw.value != value:
                    intact = False
    return marks, intact


def _chain_mark(rules: List[List[Dict[str, Any]]], both: bool) -> Optional[Fwmark]:
    if len(rules) != 1:
        return None
    stmts = rules[0]
    meta = _mangle_mark(stmts[0], "meta") if stmts else None
    if both:
        ct = _mangle_mark(stmts[1], "ct") if len(stmts) == 2 else None
        return meta if meta is not None and meta == ct else None
    return meta if len(stmts) == 2 and "accept" in stmts[1] else None


def parse_expected(marks: Iterable[Mark]) -> Dict[str, Any]:
    """The skeleton (base chains, rule count per chain) our table has for ``marks``."""
    base: Dict[str, Tuple[Any, ...]] = {}
    rules: Dict[str, int] = {}
    for cmd in build(marks):
        obj = cmd["add"]
        if "chain" in obj:
            chain = obj["chain"]
            rules.setdefault(chain["name"], 0)
            if "hook" in chain:
                base[chain["name"]] = (chain["type"], chain["hook"], chain["prio"])
        elif "rule" in obj:
            rules[obj["rule"]["chain"]] = rules.get(obj["rule"]["chain"], 0) + 1
    return {"base": base, "rules": rules}


# ---- foreign mark usage ----------------------------------------------------

#: iptables-nft targets that write marks; their arguments are opaque in JSON
XT_MARK_TARGETS = ("MARK", "CONNMARK", "TPROXY")
#: the priority of our prerouting chain: a foreign chain before it sees no mark of ours
OUR_PREROUTING_PRIO = -150


def _is_mark(expr: Any, key: str) -> bool:
    return expr == {key: {"key": "mark"}}


def _touched(key: str, value: Any) -> Tuple[int, Optional[int]]:
    """(bits written, value or None) of ``KEY mark set VALUE``: ``& keep``, ``| v``, ``^ v``
    on KEY mark itself touch only those bits; a constant writes all 32 bits with that
    value; anything else (the other mark, a map, a number generator) writes all bits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return U32, value & U32
    if _is_mark(value, key):
        return 0, None
    if isinstance(value, dict) and len(value) == 1:
        op, args = next(iter(value.items()))
        if op in ("|", "^", "&") and isinstance(args, list) and len(args) == 2 and isinstance(args[1], int):
            inner, _ = _touched(key, args[0])
            bits = ~args[1] & U32 if op == "&" else args[1] & U32
            return inner | bits, None
    return U32, None


def _describe(key: str, value: Any) -> str:
    if isinstance(value, int):
        return f"{key} mark set 0x{value:x}"
    for other in ("meta", "ct"):
        if _is_mark(value, other):
            return f"{key} mark set {other} mark"
    return f"{key} mark set <expression>"


def _rule_writes(rule: Dict[str, Any]) -> List[Tuple[int, Optional[int], str]]:
    """Each mark write of one rule: (bits, value or None, what it does)."""
    out = []
    for stmt in rule.get("expr", []):
        if not isinstance(stmt, dict):
            continue
        if "xt" in stmt:
            xt = stmt["xt"] or {}
            name = xt.get("name") if isinstance(xt, dict) else None
            if not isinstance(xt, dict) or xt.get("type") == "target" and (name is None or name in XT_MARK_TARGETS):
                out.append((U32, None, f"iptables-nft target {name or '(unknown)'} (its mask is not visible)"))
            continue
        mangle = stmt.get("mangle")
        if not isinstance(mangle, dict):
            continue
        key = next((k for k in ("meta", "ct") if _is_mark(mangle.get("key"), k)), None)
        if key is None:
            continue
        bits, value = _touched(key, mangle.get("value"))
        if bits:
            out.append((bits, value, _describe(key, mangle.get("value"))))
    return out


def _foreign_rules(ruleset: Dict[str, Any]) -> List[Dict[str, Any]]:
    rules = []
    for item in ruleset.get("nftables", []):
        rule = item.get("rule")
        if rule and (rule.get("family"), rule.get("table")) != (FAMILY, NFT_TABLE):
            rules.append(rule)
    return rules


def _owner(rule: Dict[str, Any]) -> str:
    return nft_owner(str(rule.get("family")), str(rule.get("table")), str(rule.get("chain")))


def foreign_marks(ruleset: Dict[str, Any]) -> List[Tuple[Fwmark, str]]:
    """Mark bits other nft tables manage (masked writes) or values they write (constants):
    the allocation avoids them and an explicit fwmark that overlaps is a conflict."""
    found: List[Tuple[Fwmark, str]] = []
    for rule in _foreign_rules(ruleset):
        for bits, value, _ in _rule_writes(rule):
            if bits != U32:
                found.append((Fwmark(-1, bits), _owner(rule)))
            elif value is not None:
                found.append((Fwmark(value, U32), _owner(rule)))
    return found


def all_bit_writers(ruleset: Dict[str, Any]) -> List[str]:
    """Foreign rules that write all 32 mark bits (a constant, a copy of the other mark,
    an iptables-nft MARK/CONNMARK target): any policy's mark is lost on the packets they
    match. No allocation can avoid them; they are reported."""
    found = []
    for rule in _foreign_rules(ruleset):
        for bits, _, what in _rule_writes(rule):
            if bits == U32:
                found.append(f"{_owner(rule)}: {what}")
    return found


def _families_of(rule: Dict[str, Any]) -> Tuple[int, ...]:
    family = rule.get("family")
    if family in ("ip", "ip6"):
        return (4,) if family == "ip" else (6,)
    for stmt in rule.get("expr", []):
        match = stmt.get("match") if isinstance(stmt, dict) else None
        if match and match.get("left") == {"meta": {"key": "nfproto"}} and match.get("op") == "==":
            return {"ipv4": (4,), "ipv6": (6,)}.get(match.get("right"), (4, 6))
    return (4, 6)


def _strict_rpfilter(rule: Dict[str, Any]) -> bool:
    """``fib saddr . iif oif missing drop`` (firewalld's strict IPv6 reverse-path filter)."""
    exprs = [s for s in rule.get("expr", []) if isinstance(s, dict)]
    if not any("drop" in s for s in exprs):
        return False
    for stmt in exprs:
        match = stmt.get("match") or {}
        fib = match.get("left", {}).get("fib") if isinstance(match.get("left"), dict) else None
        if fib and fib.get("result") == "oif" and {"saddr", "iif"} <= set(fib.get("flags", [])) \
                and match.get("right") in (False, "missing", 0) and match.get("op") in ("==", None):
            return True
    return False


def _verdict_targets(node: Any, maps: Dict[Tuple[Any, Any, str], List[Any]], table: Tuple[Any, Any]) -> List[str]:
    """Chains a rule's expressions can jump or go to: plain verdicts, anonymous verdict maps
    (``vmap { k : jump c }``) and named ones (``vmap @m``: the map's elements)."""
    if isinstance(node, list):
        return [t for item in node for t in _verdict_targets(item, maps, table)]
    if not isinstance(node, dict):
        return []
    targets = [str(node[v].get("target")) for v in ("jump", "goto") if isinstance(node.get(v), dict)]
    data = node.get("vmap", {}).get("data") if isinstance(node.get("vmap"), dict) else None
    if isinstance(data, str) and data.startswith("@"):
        targets += _verdict_targets(maps.get((*table, data[1:]), []), maps, table)
    return targets + [t for key, value in node.items() if key not in ("jump", "goto")
                      for t in _verdict_targets(value, maps, table)]


def early_rpfilter(ruleset: Dict[str, Any]) -> List[Tuple[int, str]]:
    """(family, owner) of foreign strict reverse-path filters that run in prerouting before
    our marking (in a base chain of lower priority, or a chain it jumps to, also by a verdict
    map): they drop what an incoming policy is for before it is marked."""
    rules = _foreign_rules(ruleset)
    maps = {(m.get("family"), m.get("table"), m.get("name")): m.get("elem") or []
            for m in (item.get("map") for item in ruleset.get("nftables", [])) if m and m.get("map") == "verdict"}
    early = set()
    for item in ruleset.get("nftables", []):
        chain = item.get("chain")
        if chain and chain.get("hook") == "prerouting" and isinstance(chain.get("prio"), int) \
                and chain["prio"] < OUR_PREROUTING_PRIO:
            early.add((chain.get("family"), chain.get("table"), chain.get("name")))
    grown = True
    while grown:  # chains reached by jump/goto from an early chain run early too
        reached = {(r.get("family"), r.get("table"), target) for r in rules
                   if (r.get("family"), r.get("table"), r.get("chain")) in early
                   for target in _verdict_targets(r.get("expr", []), maps, (r.get("family"), r.get("table")))}
        grown = not reached <= early
        early |= reached
    found = []
    for rule in rules:
        if (rule.get("family"), rule.get("table"), rule.get("chain")) in early and _strict_rpfilter(rule):
            found += [(family, _owner(rule)) for family in _families_of(rule)]
    return found
