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

from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

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


def delta(before: Iterable[Mark], after: Iterable[Mark], skeleton_kept: Optional[bool] = None,
          shapes: Optional[Tuple[Iterable[Mark], Iterable[Mark]]] = None) -> Optional[Dict[str, Any]]:
    """The transaction from ``before`` to ``after`` (both non-empty, same masks); None when the
    table must be replaced instead; an empty command list when nothing changes.

    ``before`` and ``after`` may also be the part of the table that changes — every entry
    of each mark value concerned — when the caller, who knows the whole table, tells
    whether its skeleton stays (``skeleton_kept``: the table exists before and after, with
    the same masks) and gives the whole table's ``shapes`` before and after (one mark of
    each direction and mask in use, :meth:`MarkIndex.samples`): the base chains' rules
    depend on those, never on a part."""
    before, after = set(before), set(after)
    fb, fa = _fwmarks(before), _fwmarks(after)
    if skeleton_kept is None:
        skeleton_kept = bool(before and after) and {f.mask for f in fb} == {f.mask for f in fa}
    if not skeleton_kept:
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
    whole_before, whole_after = shapes if shapes is not None else (before, after)
    rules = nftjson.base_rules(whole_after)
    if rules != nftjson.base_rules(whole_before):  # a direction came or went: the base chains' rules anew
        cmds += [{"flush": {"chain": dict(_TABLE, name=name)}} for name in ("prerouting", "output")]
        cmds += rules
    return {"nftables": cmds}


class MarkIndex:
    """Marks (our table's, as last listed or committed) by interface and by mark value, with how
    many entries use each mask (the table's skeleton): the part of the table one connection's
    change concerns, for :func:`delta`, is found in O(1)."""

    def __init__(self, marks: Iterable[Mark]) -> None:
        self.marks: Set[Mark] = set()
        self.by_iface: Dict[str, Set[Mark]] = {}
        self.by_fwmark: Dict[Fwmark, Set[Mark]] = {}
        self.masks: Dict[int, int] = {}
        self.by_shape: Dict[Tuple[str, int], Set[Mark]] = {}  # (direction, mask) -> marks
        self._update(set(), set(marks))

    def _update(self, gone: Set[Mark], new: Set[Mark]) -> None:
        for mark, step in [*((m, -1) for m in gone), *((m, 1) for m in new)]:
            fw = Fwmark(mark.value, mark.mask)
            for index, key in ((self.by_iface, mark.iface), (self.by_fwmark, fw),
                               (self.by_shape, (mark.direction, mark.mask))):
                entries = index.setdefault(key, set())
                entries.add(mark) if step > 0 else entries.discard(mark)
                if not entries:
                    del index[key]
            self.masks[mark.mask] = self.masks.get(mark.mask, 0) + step
            if not self.masks[mark.mask]:
                del self.masks[mark.mask]
        self.marks -= gone
        self.marks |= new

    def on(self, ifaces: Iterable[str]) -> Set[Mark]:
        return {m for iface in ifaces for m in self.by_iface.get(iface, ())}

    def change(self, before: Set[Mark], after: Set[Mark]) -> Tuple[Set[Mark], Set[Mark], bool]:
        """(every entry of the mark values concerned now, the same afterwards, whether the table's
        skeleton stays) for one connection's marks going from ``before`` to ``after``."""
        gone, new = before - after, after - before
        values = {Fwmark(m.value, m.mask) for m in gone | new}
        now = {m for fw in values for m in self.by_fwmark.get(fw, ())}
        later = (now - gone) | new
        masks = dict(self.masks)
        for mark, step in [*((m, -1) for m in now - later), *((m, 1) for m in later - now)]:
            masks[mark.mask] = masks.get(mark.mask, 0) + step
        kept = bool(self.marks) and {k for k, v in masks.items() if v} == set(self.masks)
        return now, later, kept

    def samples(self, gone: Set[Mark] = frozenset(), new: Set[Mark] = frozenset()) -> List[Mark]:
        """One mark of each (direction, mask) in the table, once ``gone`` left and ``new`` came
        (O(shapes + changes)): what the base chains' rules depend on."""
        out: Dict[Tuple[str, int], Mark] = {}
        for shape, marks in self.by_shape.items():
            for mark in marks:  # (at most len(gone) + 1 steps)
                if mark not in gone:
                    out[shape] = mark
                    break
        for mark in new:
            out.setdefault((mark.direction, mark.mask), mark)
        return list(out.values())

    def apply(self, now: Set[Mark], later: Set[Mark]) -> None:
        self._update(now - later, later - now)
