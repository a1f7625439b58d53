"""Change our nftables table element by element: one connection's marking costs O(1).

Pure, like nftjson: marks before and after -> one libnftables JSON transaction that
deletes the map elements (and the per-mark chains) no longer wanted and adds the new
ones, leaving everything else of the table untouched. The chains and rules it adds are
taken from :func:`nftjson.build`, so the table ends exactly as a fresh build would
make it. When the directions in use change, the base chains' few rules are written anew in
the same transaction; when the masks change (new maps) there is no delta: the caller
replaces the table.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Set

from . import nftjson
from .model import Fwmark, Mark

_TABLE = {"family": nftjson.FAMILY, "table": nftjson.NFT_TABLE}


def _fwmarks(marks: Iterable[Mark], direction: Optional[str] = None) -> Set[Fwmark]:
    return {Fwmark(m.value, m.mask) for m in marks if direction is None or m.direction == direction}


def _key(fw: Fwmark) -> tuple:
    return (fw.mask, fw.value)


def _element(verb: str, name: str, elem: List[Any]) -> Dict[str, Any]:
    return {verb: {"element": dict(_TABLE, name=name, elem=elem)}}


def _jump(chain: str) -> Dict[str, Any]:
    return {"jump": {"target": chain}}


def delta(before: Iterable[Mark], after: Iterable[Mark]) -> Optional[Dict[str, Any]]:
    """The transaction from ``before`` to ``after`` (both non-empty, same masks); None when the
    table must be replaced instead; an empty command list when nothing changes."""
    before, after = set(before), set(after)
    fb, fa = _fwmarks(before), _fwmarks(after)
    if not before or not after or {f.mask for f in fb} != {f.mask for f in fa}:
        return None
    ib, ia = _fwmarks(before, "incoming"), _fwmarks(after, "incoming")
    cmds: List[Dict[str, Any]] = []
    for mark in sorted(before - after):
        cmds.append(_element("delete", mark.direction, [mark.iface]))
    for fw in sorted(fb - fa, key=_key):
        cmds.append(_element("delete", nftjson.restore_map(fw.mask), [fw.value]))
    gone = [c for fw in sorted(fb - fa, key=_key) for c in (nftjson.set_chain(fw), nftjson.restore_chain(fw))]
    gone += [nftjson.in_chain(fw) for fw in sorted(ib - ia, key=_key)]
    for chain in gone:
        cmds.append({"flush": {"chain": dict(_TABLE, name=chain)}})
        cmds.append({"delete": {"chain": dict(_TABLE, name=chain)}})
    new = {c for fw in fa - fb for c in (nftjson.set_chain(fw), nftjson.restore_chain(fw))}
    new |= {nftjson.in_chain(fw) for fw in ia - ib}
    if new:  # built from the marks of the new chains only: their rules depend on nothing else
        grown = (fa - fb) | (ia - ib)
        for cmd in nftjson.build(m for m in after if Fwmark(m.value, m.mask) in grown):
            obj = cmd.get("add", {})
            if ("chain" in obj and obj["chain"]["name"] in new) or ("rule" in obj and obj["rule"]["chain"] in new):
                cmds.append(cmd)
    for fw in sorted(fa - fb, key=_key):
        cmds.append(_element("add", nftjson.restore_map(fw.mask), [[fw.value, _jump(nftjson.restore_chain(fw))]]))
    chain_of = {"incoming": nftjson.in_chain, "outgoing": nftjson.set_chain}
    for mark in sorted(after - before):
        target = chain_of[mark.direction](Fwmark(mark.value, mark.mask))
        cmds.append(_element("add", mark.direction, [[mark.iface, _jump(target)]]))
    rules = nftjson.base_rules(after)
    if rules != nftjson.base_rules(before):  # a direction came or went: the base chains' rules anew
        cmds += [{"flush": {"chain": dict(_TABLE, name=name)}} for name in ("prerouting", "output")]
        cmds += rules
    return {"nftables": cmds}
