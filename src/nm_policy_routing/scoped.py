"""The daemon's one-connection reconcile: an event's cost does not grow with the number of
active connections.

The connection is planned alone, against the other connections' recorded allocations
(they never move for it); its entries are diffed against the daemon's resident views of
the kernel (adapters/resident.py), applied with the engine's own steps (sysctls, routes,
rules, then the nft marking as one element-by-element transaction; removal in reverse),
and verified against those views, in which the tables it changed were read back. The
full reconcile (reconcile.Engine) stays the reference: whenever this is not the simple
case — a conflict with another connection, an allocation that would move, an interface
another connection holds, an error from the kernel — the caller runs the full one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .errors import PolicyRoutingError
from .model import Allocation, Connection, ConnectionPlan, ForeignUsage, KernelState
from .planner import plan
from .record import (Record, allocation_from_json, allocation_to_json, connection_from_json, connection_to_json,
                     locked, policy_from_json, policy_to_json)

if TYPE_CHECKING:
    from .reconcile import Engine, Result

log = logging.getLogger(__name__)


class _Union:
    """``table in tables`` over the foreign tables and the other connections' tables."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def __contains__(self, item: object) -> bool:
        return item in self.second or item in self.first


def _with_others(foreign: ForeignUsage, others: Dict[str, Tuple[str, Allocation]]) -> ForeignUsage:
    """What the other connections hold, as the planner sees what foreign owners hold."""
    tables = {alloc.table for _, alloc in others.values()}
    priorities = {(f, alloc.priority) for _, alloc in others.values() for f in (4, 6)}
    marks = tuple((alloc.fwmark, f"connection {label}") for label, alloc in others.values() if alloc.fwmark)
    return ForeignUsage(_Union(foreign.tables, tables), foreign.priorities | priorities, foreign.marks + marks)


def _entries_of(state: KernelState, table: Optional[int], iface: Optional[str]) -> KernelState:
    """The entries of ``state`` that belong to one connection (its table, its interface)."""
    return KernelState(  # (an incoming policy's forward rule looks up main: it is ours by its iif)
        frozenset(r for r in state.rules if r.table == table or (iface and getattr(r, "iif", None) == iface)),
        frozenset(r for r in state.routes if r.table == table),
        frozenset(m for m in state.marks if m.iface == iface),
        frozenset(s for s in state.sysctls if s.iface == iface),
    )


class Scoped:
    """ensure/remove one connection in O(1); None when the full reconcile must do it."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        #: the record as this process last saved it, with the file's (inode, size, mtime): loaded
        #: and checked again only when someone else wrote it since
        self._kept: Optional[Tuple[Tuple[int, int, int], Record]] = None

    def _stamp(self) -> Optional[Tuple[int, int, int]]:
        try:
            st = os.stat(os.path.join(self.engine.directory, "state.json"))
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> Record:
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == self._stamp():
            return kept[1]
        return Record.load(self.engine.directory)

    def ensure(self, conn: Connection) -> Optional["Result"]:
        return self._run(conn.uuid, conn)

    def remove(self, uuid: str) -> Optional["Result"]:
        return self._run(uuid, None)

    def _run(self, uuid: str, conn: Optional[Connection]) -> Optional["Result"]:
        if self.engine.dry_run:
            return None
        with locked(self.engine.directory):
            record = self._load()
            kernel = self.engine._kernel()
            try:
                result = self._reconcile(kernel, record, uuid, conn)
                if result is not None:
                    stamp = self._stamp()
                    self._kept = (stamp, record) if stamp is not None else None
                return result
            except PolicyRoutingError as exc:
                log.warning("one-connection change of %s failed (%s); reconciling everything", uuid, exc)
                return None
            finally:
                kernel.close()

    def _reconcile(self, kernel, record: Record, uuid: str, conn: Optional[Connection]) -> Optional["Result"]:
        from .reconcile import Result
        from .story import owners_of

        if getattr(record, "damaged", None):
            return None  # a damaged record is rebuilt by the full reconcile
        data = record.data
        labels = {u: (c.get("id") or u) for u, c in data["connections"].items()}
        others = {u: (f"{labels[u]} ({u})", allocation_from_json(a)) for u, a in data["allocations"].items()
                  if u != uuid and u in labels}
        previous = allocation_from_json(data["allocations"][uuid]) if uuid in data["allocations"] else None
        old = data["connections"].get(uuid)
        old_iface = (old or {}).get("iface")
        if conn is not None and any(c.get("iface") == conn.iface for u, c in data["connections"].items()
                                    if u != uuid):
            return None  # two connections on one interface: the full plan says who wins
        if _has_apps(self.engine, old):
            return None  # per-application routing (socket programs, cgroups): the full reconcile does it
        before = kernel.read(record.sysctl_originals())
        result = Result()
        cp: Optional[ConnectionPlan] = None
        new = KernelState()
        if conn is not None:
            held = self.engine._held_back(kernel, {uuid: conn}, result).get(uuid, ())
            planned = replace(conn, addresses=tuple(a for a in conn.addresses if a.ip not in held))
            cache = _LazyPolicies(data["policies"])
            the_plan = plan([planned], _with_others(kernel.foreign(), others),
                            {uuid: previous} if previous else {}, self.engine.defaults(), cache)
            cp = the_plan.connections[0]
            if cp.status == "conflict" or (previous and cp.allocation and cp.allocation != previous):
                return None
            if getattr(cp.policy, "apps", ()) or getattr(cp.state, "sockmarks", ()):
                return None  # per-application routing: the full reconcile does it
            new = cp.state if cp.status == "ok" else KernelState()
            data["policies"].update({k: policy_to_json(p) for k, p in cache.new.items()})
        mine = _entries_of(before, previous.table if previous else None, old_iface) | \
            _entries_of(before, cp.allocation.table if cp and cp.allocation else None, conn.iface if conn else None)
        target = KernelState.union([before - mine, new])
        if conn is None:
            data["connections"].pop(uuid, None)
            data["allocations"].pop(uuid, None)
            data["outcomes"].pop(uuid, None)
        else:
            data["connections"][uuid] = connection_to_json(conn)
            if cp and cp.allocation:
                data["allocations"][uuid] = allocation_to_json(cp.allocation)
        known = dict(data["sysctls"])
        self.engine._record_originals(kernel, record, new.sysctls)
        if conn is not None and (cp is None or cp.allocation != previous or data["sysctls"] != known):
            record.save()  # a new allocation and originals first, as the full reconcile does
        try:
            old_conn = [connection_from_json(old)] if old else []
        except (KeyError, TypeError, ValueError):
            old_conn = []  # (only for naming the connection in the log)
        result.owner = owners_of({c.uuid: c for c in old_conn}, {uuid: previous} if previous else {},
                                 [cp] if cp is not None else [])
        restored: List[str] = []
        self.engine._add(kernel, record, new - before, result)
        self.engine._set_marks(kernel, before, target, result)
        self.engine._remove_stale(kernel, record, before, target, result, restored)
        if result.changes:
            self.engine._verify(kernel, record, target)
        for key in restored:  # verified: the originals of what was restored are no longer needed
            data["sysctls"].pop(key, None)
        if cp is not None:
            result.plans = [cp]
            record.set_outcome(uuid, {"id": cp.connection.id, "iface": cp.connection.iface, "status": cp.status,
                                      "errors": list(cp.errors)})
        record.save()
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
