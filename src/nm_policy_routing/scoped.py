"""The daemon's one-connection reconcile: an event's cost does not grow with the number of
active connections.

The connection is planned alone, against the other connections' recorded allocations
(they never move for it; kept indexed across events), its own entries are read from the
daemon's resident views of the kernel (adapters/resident.py: by table and interface),
the difference is applied with the engine's own steps (sysctls, routes, rules, then its
nft marking as one element-by-element transaction; removal in reverse), read back and
verified the same way, and the record saves only the entries that changed. The full
reconcile (reconcile.Engine) stays the reference: whenever this is not the simple case —
a conflict with another connection (or a removal while another was refused for one), an
allocation that would move, an interface another connection holds, an error from the kernel —
the caller runs the full one.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Set, Tuple

from .errors import PolicyRoutingError
from .model import Allocation, Connection, ConnectionPlan, ForeignUsage, Fwmark, KernelState, Sysctl, replace
from .planner import SYSCTL_KEYS, plan
from .record import (Record, allocation_from_json, allocation_to_json, connection_from_json, connection_to_json,
                     locked, policy_from_json, policy_to_json)
from .recordfiles import generation
from .rollback import slot

if TYPE_CHECKING:
    from .reconcile import Engine, Result

log = logging.getLogger(__name__)


class _Union:
    """``item in`` either of two containers (what foreign owners hold, what other connections hold)."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def __contains__(self, item: object) -> bool:
        return item in self.second or item in self.first


class _AnyFamilyOf:
    """``(family, priority) in``: the priorities other connections hold are theirs in both families."""

    def __init__(self, priorities: Dict[int, str]) -> None:
        self.priorities = priorities

    def __contains__(self, item: object) -> bool:
        return isinstance(item, tuple) and len(item) == 2 and item[1] in self.priorities


class _Held:
    """The recorded connections, indexed: each one's label, interface and allocation, and which
    connection holds a table, a priority, a mark. Built once per record loaded, kept current by
    this path's changes (a record someone else wrote is loaded and indexed again)."""

    def __init__(self, data: Dict[str, Any]) -> None:
        self.label: Dict[str, str] = {}
        self.iface_of: Dict[str, str] = {}
        self.on_iface: Dict[str, Set[str]] = {}
        self.alloc: Dict[str, Allocation] = {}
        self.tables: Dict[int, str] = {}
        self.priorities: Dict[int, str] = {}
        self.marks: Dict[int, Dict[int, Tuple[Fwmark, str]]] = {}
        for uuid, conn in data["connections"].items():
            self.put_connection(uuid, conn)
        for uuid, alloc in data["allocations"].items():
            if uuid in self.label:
                self.put_allocation(uuid, allocation_from_json(alloc))

    def put_connection(self, uuid: str, conn: Dict[str, Any]) -> None:
        self.label[uuid] = f"{conn.get('id') or uuid} ({uuid})"
        self._move(uuid, conn.get("iface") or None)

    def _move(self, uuid: str, iface: Optional[str]) -> None:
        old = self.iface_of.pop(uuid, None)
        if old is not None:
            self.on_iface.get(old, set()).discard(uuid)
            if not self.on_iface.get(old, True):
                del self.on_iface[old]
        if iface:
            self.iface_of[uuid] = iface
            self.on_iface.setdefault(iface, set()).add(uuid)

    def put_allocation(self, uuid: str, alloc: Optional[Allocation]) -> None:
        self.drop_allocation(uuid)
        if alloc is None:
            return
        self.alloc[uuid] = alloc
        label = self.label.get(uuid, uuid)
        self.tables[alloc.table] = label
        self.priorities[alloc.priority] = label
        if alloc.fwmark:
            values = self.marks.setdefault(alloc.fwmark.mask, {})
            values.setdefault(alloc.fwmark.value & alloc.fwmark.mask, (alloc.fwmark, label))

    def drop_allocation(self, uuid: str) -> None:
        alloc = self.alloc.pop(uuid, None)
        if alloc is None:
            return
        label = self.label.get(uuid, uuid)
        for index, key in ((self.tables, alloc.table), (self.priorities, alloc.priority)):
            if index.get(key) == label:
                del index[key]
        if alloc.fwmark:
            values = self.marks.get(alloc.fwmark.mask, {})
            if values.get(alloc.fwmark.value & alloc.fwmark.mask, (None, None))[1] == label:
                del values[alloc.fwmark.value & alloc.fwmark.mask]
                if not values:
                    del self.marks[alloc.fwmark.mask]

    def forget(self, uuid: str) -> None:
        self.drop_allocation(uuid)
        self._move(uuid, None)
        self.label.pop(uuid, None)

    def usage(self, foreign: ForeignUsage) -> ForeignUsage:
        """What foreign owners and the indexed connections hold, as the planner sees foreign usage."""
        return replace(foreign, tables=_Union(foreign.tables, self.tables),
                       priorities=_Union(foreign.priorities, _AnyFamilyOf(self.priorities)),
                       held_marks=self.marks)


def _slots(originals: Dict[str, int], ifaces: Iterable[str], wanted: KernelState) -> Set[str]:
    """The recorded sysctl originals of these interfaces, and the slots ``wanted`` sets."""
    candidates = {slot(Sysctl("ipv4", iface, key, 0)) for iface in ifaces for key in SYSCTL_KEYS}
    return {key for key in candidates if key in originals} | {slot(s) for s in wanted.sysctls}


class Scoped:
    """ensure/remove one connection in O(1); None when the full reconcile must do it."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        #: the record as this process last saved it and its index, with the stamp of the record
        #: on disk (state.json's inode, size, mtime and the save count): loaded and indexed again
        #: only when someone else wrote it since
        self._kept: Optional[Tuple[Tuple[Any, ...], Record, _Held]] = None

    def _stamp(self) -> Optional[Tuple[Any, ...]]:
        try:
            st = os.stat(os.path.join(self.engine.directory, "state.json"))
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, generation(self.engine.directory))

    def _load(self) -> Tuple[Record, Optional[_Held]]:
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == self._stamp():
            return kept[1], kept[2]
        record = Record.load(self.engine.directory)
        return record, None if record.damaged else _Held(record.data)

    def ensure(self, conn: Connection) -> Optional["Result"]:
        return self._run(conn.uuid, conn)

    def remove(self, uuid: str) -> Optional["Result"]:
        return self._run(uuid, None)

    def _run(self, uuid: str, conn: Optional[Connection]) -> Optional["Result"]:
        if self.engine.dry_run:
            return None
        with locked(self.engine.directory):
            record, held = self._load()
            if held is None:
                return None  # a damaged record is rebuilt by the full reconcile
            kernel = self.engine._kernel()
            try:
                result = self._reconcile(kernel, record, held, uuid, conn)
                if result is not None:
                    stamp = self._stamp()
                    self._kept = (stamp, record, held) if stamp is not None else None
                return result
            except PolicyRoutingError as exc:
                log.debug("one-connection change of %s failed (%s); reconciling everything", uuid, exc)
                return None
            finally:
                kernel.close()

    def _reconcile(self, kernel, record: Record, held: _Held, uuid: str,
                   conn: Optional[Connection]) -> Optional["Result"]:
        from .reconcile import Result
        from .story import owners_of

        data = record.data
        previous = held.alloc.get(uuid)
        old = data["connections"].get(uuid)
        ifaces = {i for i in (held.iface_of.get(uuid), conn.iface if conn else None) if i}
        if any(held.on_iface.get(iface, set()) - {uuid} for iface in ifaces):
            return None  # two connections on one interface: the full plan says who wins
        if _has_apps(self.engine, old):
            return None  # per-application routing (socket programs, cgroups): the full reconcile does it
        if conn is None and any(isinstance(o, dict) and o.get("status") == "conflict"
                                for u, o in data["outcomes"].items() if u != uuid):
            return None  # a connection refused for a conflict may get its policy now: the full plan says
        result = Result()
        cp: Optional[ConnectionPlan] = None
        new = KernelState()
        if conn is not None:
            waiting = self.engine._held_back(kernel, {uuid: conn}, result).get(uuid, ())
            planned = replace(conn, addresses=tuple(a for a in conn.addresses if a.ip not in waiting))
            cache = _LazyPolicies(data["policies"])
            held.drop_allocation(uuid)  # planned against the others
            try:
                the_plan = plan([planned], held.usage(kernel.foreign()), {uuid: previous} if previous else {},
                                self.engine.defaults(), cache)
            finally:
                held.put_allocation(uuid, previous)
            cp = the_plan.connections[0]
            if cp.status == "conflict" or (previous and cp.allocation and cp.allocation != previous):
                return None
            if getattr(cp.policy, "apps", ()) or getattr(cp.state, "sockmarks", ()):
                return None  # per-application routing: the full reconcile does it
            new = cp.state if cp.status == "ok" else KernelState()
            data["policies"].update({k: policy_to_json(p) for k, p in cache.new.items()})
        tables = {a.table for a in (previous, cp.allocation if cp else None) if a}
        slots = _slots(data["sysctls"], ifaces, KernelState())
        mine = kernel.read_scope(tables, ifaces, slots)
        if conn is None:
            data["connections"].pop(uuid, None)
            data["allocations"].pop(uuid, None)
            data["outcomes"].pop(uuid, None)
            held.forget(uuid)
        else:
            data["connections"][uuid] = connection_to_json(conn)
            held.put_connection(uuid, data["connections"][uuid])
            if cp and cp.allocation:
                data["allocations"][uuid] = allocation_to_json(cp.allocation)
                held.put_allocation(uuid, cp.allocation)
        self.engine._record_originals(kernel, record, new.sysctls)
        if conn is not None and (cp is None or cp.allocation != previous or data["sysctls"].changed):
            record.save(changes_only=True)  # a new allocation and originals first, as the full reconcile does
        try:
            old_conn = [connection_from_json(old)] if old else []
        except (KeyError, TypeError, ValueError):
            old_conn = []  # (only for naming the connection in the log)
        result.owner = owners_of({c.uuid: c for c in old_conn}, {uuid: previous} if previous else {},
                                 [cp] if cp is not None else [])
        restored: List[str] = []
        self.engine._add(kernel, record, new - mine, result)
        self.engine._set_marks(kernel, mine, new, result, write=lambda marks: kernel.change_marks(mine.marks, marks))
        self.engine._remove_stale(kernel, record, mine, new, result, restored, slots=slots)
        if result.changes:
            after = _slots(data["sysctls"], ifaces, new)
            self.engine._verify(kernel, record, new, read=lambda: kernel.read_scope(tables, ifaces, after))
        for key in restored:  # verified: the originals of what was restored are no longer needed
            data["sysctls"].pop(key, None)
        if cp is not None:
            result.plans = [cp]
            record.set_outcome(uuid, {"id": cp.connection.id, "iface": cp.connection.iface, "status": cp.status,
                                      "errors": list(cp.errors)})
        record.save(changes_only=True)
        return result


class _LazyPolicies(dict):
    """The record's validated policies, decoded only when asked for (the planner asks for one)."""

    def __init__(self, raw: Dict[str, dict]) -> None:
        super().__init__()
        self.raw = raw
        self.new: Dict[str, object] = {}

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self.raw

    def __getitem__(self, key: str):
        if not dict.__contains__(self, key):
            dict.__setitem__(self, key, policy_from_json(self.raw[key]))
        return dict.__getitem__(self, key)

    def __setitem__(self, key: str, value) -> None:
        self.new[key] = value
        dict.__setitem__(self, key, value)


def _has_apps(engine, old: Optional[dict]) -> bool:
    """Did the connection's recorded policy route applications (from its profile or the defaults)?"""
    if not old:
        return False
    try:
        conn = connection_from_json(old)
    except (KeyError, TypeError, ValueError):
        return True  # unreadable: let the full reconcile judge
    keys = {**engine.defaults().for_connection(conn), **dict(conn.user_data)}
    return any(k.endswith(".apps") and str(v).strip() for k, v in keys.items())
