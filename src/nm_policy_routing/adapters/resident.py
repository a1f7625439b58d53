"""The daemon's resident kernel: one LiveKernel kept open across engine calls.

The daemon's watches skip the notifications of its own changes (by the engine's
netlink socket and the engine thread that commits nft batches): the engine verifies
what it changed, and a resync after each of its own changes would make every event
cost O(N) again.

One netlink socket and one libnftables context serve every event (no socket set-up per
event), and the mark bits other nft tables write are listed once and remembered until
the daemon's nftables watch reports a change to a table that is not ours (or the
periodic check runs): that listing forks a child and reads the whole ruleset, the
most expensive read of an event. Likewise our own table: listing it is O(N) (three
chains per mark), so the view of it is the last listing or the last committed
transaction (all or nothing), kept until the watch reports a change to it by anyone
else, lost notifications, or the periodic check; it is indexed by interface and mark
value, and one connection's change is committed over nfnetlink directly (nftraw.py:
libnftables would read the whole table first). Sysctl values are remembered as read
(one file per interface and key), forgotten when a link appears or comes up and at the
periodic check; a value we write is read back for real. Rules and routes: the last dump,
kept current by our own acknowledged changes, the routes of each table we change read
back at the next read (a dump the kernel filters by table), everything dumped again
when the netlink watch reports a link or address change, someone else's rule or route
change, lost notifications, or at the periodic check; indexed by table (and rules by
incoming interface), so one connection's entries are read in O(1) (``read_scope``). What
other owners use (foreign rules' priorities and marks) is kept until someone else changes a
rule or route. Used from the daemon's one engine thread only.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .. import nftdelta
from ..errors import KernelError
from ..model import RT_PROTO, ForeignUsage, KernelState, Mark, Route, Rule, Sysctl
from . import nfnetlink, nftraw, sysctl
from .kernel import LiveKernel
from .rtnl import Rtnl
from .nftables import Nftables

#: the routes of up to this many changed tables are read back table by table, more by one dump
TABLES_READ_ONE_BY_ONE = 8


class _RememberingNftables(Nftables):
    def __init__(self) -> None:
        super().__init__()
        self.remembered: Optional[tuple] = None
        #: our table's marks as last listed or committed; None: list it again
        self.view: Optional[nftdelta.MarkIndex] = None

    def foreign(self):
        """(marks, writers, early reverse-path filters) of the other nft tables, as last listed."""
        found = self.remembered
        if found is None:
            found = self.remembered = super().foreign()
        return tuple(list(part) for part in found)

    def index(self) -> Optional[nftdelta.MarkIndex]:
        """The view of our table (listed when there is none); None when the table is not as written."""
        if self.view is None:
            marks, intact, _ = super().our_marks()
            self.view = nftdelta.MarkIndex(marks) if intact else None
        return self.view

    def our_marks(self) -> Tuple[Set[Mark], bool, bool]:
        view = self.view
        if view is not None:
            return set(view.marks), True, bool(view.marks)
        marks, intact, exists = super().our_marks()
        self.view = nftdelta.MarkIndex(marks) if intact else None
        return marks, intact, exists

    def replace(self, marks: Iterable[Mark], exists: bool) -> None:
        marks = frozenset(marks)
        self.view = None
        super().replace(marks, exists)
        self.view = nftdelta.MarkIndex(marks)

    def change(self, cmd: Dict[str, Any]) -> None:
        view, self.view = self.view, None  # set again by the caller once committed
        super().change(cmd)
        self.view = view


class _RememberingRtnl(Rtnl):
    """Our rules (with the foreign ones) and routes as last read, kept current by our own
    acknowledged changes and indexed by table (and rules by incoming interface); the routes
    of a table we changed are read back (a dump the kernel filters by table: O(1)) at the
    next read, or all of ours by one dump when many changed. What others use (foreign_usage)
    is kept until someone else changes a rule or a route."""

    def __init__(self) -> None:
        super().__init__()
        self.forget_rules = False
        self.forget_routes = False
        self._routes_by_table: Optional[Dict[int, Set[Route]]] = None
        self._touched: Set[int] = set()
        self._rules_by: Optional[Dict[Tuple[str, Any], Set[Rule]]] = None
        self._foreign: Optional[ForeignUsage] = None

    def invalidate(self) -> None:
        if self.forget_rules:
            self.forget_rules = False
            self._rule_dump.clear()
            self._rules_by = None
            self._foreign = None

    def _rule_index(self) -> Dict[Tuple[str, Any], Set[Rule]]:
        """("table", T) / ("iif", IFACE) / ("all", None) -> our rules."""
        if self._rules_by is None:
            self._rules_by = {("all", None): set()}
            for rule in super().our_rules():
                self._index_rule(rule, True)
        return self._rules_by

    def _index_rule(self, rule: Rule, present: bool) -> None:
        index = self._rules_by
        if index is None:
            return
        for key in (("all", None), ("table", rule.table), ("iif", rule.iif)):
            entries = index.setdefault(key, set())
            entries.add(rule) if present else entries.discard(rule)

    def our_rules(self) -> Set[Rule]:
        return set(self._rule_index()[("all", None)])

    def our_rules_of(self, tables: Iterable[int], ifaces: Iterable[str]) -> Set[Rule]:
        index = self._rule_index()
        keys = [("table", t) for t in tables] + [("iif", i) for i in ifaces]
        return {rule for key in keys for rule in index.get(key, ())}

    def foreign_usage(self) -> ForeignUsage:
        self.invalidate()
        if self._foreign is None:
            self._foreign = super().foreign_usage()
        return self._foreign

    def rules_changed(self, added: Sequence[Rule], deleted: Sequence[Rule]) -> None:
        """Our acknowledged changes kept in the index (O(changes)); the dump then still serves
        for the foreign rules, the only ones read from it while the index exists (it is dropped
        with the index when someone else changes a rule)."""
        if self._rules_by is None:
            super().rules_changed(added, deleted)  # no index: the dump is read again when needed
            return
        for rule in deleted:
            self._index_rule(rule, False)
        for rule in added:
            self._index_rule(rule, True)

    def add_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        self._touched.update(r.table for r in routes)
        return super().add_routes(routes)

    def del_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        self._touched.update(r.table for r in routes)
        return super().del_routes(routes)

    def _route_index(self) -> Dict[int, Set[Route]]:
        if self.forget_routes or self._routes_by_table is None:
            self.forget_routes = False
            self._foreign = None  # (its tables holding foreign routes are asked lazily and kept)
            self._touched = set()
            self._routes_by_table = self._index_routes(super().our_routes())
        elif len(self._touched) > TABLES_READ_ONE_BY_ONE:  # many changed (a full reconcile): one dump
            self._touched = set()
            self._routes_by_table = self._index_routes(super().our_routes())
        elif self._touched:
            tables, self._touched = self._touched, set()
            for table in sorted(tables):
                routes = {r for family in (4, 6) for r, proto in self._routes(family, table=table)
                          if proto == RT_PROTO}
                if routes:
                    self._routes_by_table[table] = routes
                else:
                    self._routes_by_table.pop(table, None)
        return self._routes_by_table

    @staticmethod
    def _index_routes(routes: Iterable[Route]) -> Dict[int, Set[Route]]:
        index: Dict[int, Set[Route]] = {}
        for route in routes:
            index.setdefault(route.table, set()).add(route)
        return index

    def our_routes(self) -> Set[Route]:
        return {route for routes in self._route_index().values() for route in routes}

    def our_routes_of(self, tables: Iterable[int]) -> Set[Route]:
        index = self._route_index()
        return {route for table in tables for route in index.get(table, ())}


class ResidentKernel(LiveKernel):
    def __init__(self) -> None:
        super().__init__()
        self.netlink.close()
        self.netlink = _RememberingRtnl()
        self.nft = _RememberingNftables()
        #: the engine thread: nftables names it in the batches it commits
        self.thread_id = threading.get_native_id()
        #: sysctl values as last read (a value we write is read again, for the verify)
        self._sysctls: Dict[Tuple[str, str, str], int] = {}
        self._conntrack = nfnetlink.conntrack_socket()
        self._nftraw = nftraw.NftBatch()

    def _commit(self, change: Dict[str, Any]) -> None:
        """One element-by-element transaction: spoken directly (libnftables would read the whole
        table first), or by libnftables when it holds a shape nftraw does not encode."""
        try:
            self._nftraw.commit(change)
        except nftraw.Unsupported:
            self.nft.change(change)

    def read_sysctl(self, family: str, iface: str, key: str) -> Optional[int]:
        slot = (family, iface, key)
        value = self._sysctls.get(slot)
        if value is None:
            value = sysctl.read(family, iface, key)
            if value is not None:  # an absent interface may appear: never remember its absence
                self._sysctls[slot] = value
        return value

    def write_sysctl(self, entry: Sysctl) -> None:
        self._sysctls.pop(entry.slot, None)
        super().write_sysctl(entry)

    def forget_sysctls(self) -> None:
        """A link appeared or came up (it may be a new one of the same name), or the periodic check."""
        self._sysctls = {}

    def forget_routes(self) -> None:
        """Routes may have vanished unannounced (a link went down, an address went away) or
        someone else changed ours: dump them again at the next event."""
        self.netlink.forget_routes = True

    def forget_rules(self) -> None:
        """Someone else added or deleted a rule: dump them again at the next event."""
        self.netlink.forget_rules = True

    def read(self, sysctl_slots):
        self._paths = {}  # cgroup paths are asked once per reconcile (a unit may start meanwhile)
        return super().read(sysctl_slots)

    def read_scope(self, tables: Set[int], ifaces: Set[str], sysctl_slots: Iterable[str]) -> KernelState:
        """Our entries of one connection, from the views (O(1) in the number of connections)."""
        self.netlink.invalidate()
        view = self.nft.index()
        self.nft_intact = view is not None
        self.nft_exists = bool(view.marks) if view is not None else True
        return KernelState(
            frozenset(self.netlink.our_rules_of(tables, ifaces)),
            frozenset(self.netlink.our_routes_of(tables)),
            frozenset(view.on(ifaces) if view is not None else ()),
            frozenset(self.read_sysctls(sysctl_slots)),
        )

    def change_marks(self, before: Iterable[Mark], after: Iterable[Mark]) -> None:
        """One connection's marks go from ``before`` to ``after``: a transaction of the entries of
        the mark values concerned (the table whole when its skeleton changes or it is not as
        written)."""
        view = self.nft.index()
        if view is None:
            return super().change_marks(before, after)
        now, later, kept = view.change(set(before), set(after))
        change = nftdelta.delta(now, later, skeleton_kept=kept,
                                shapes=(view.samples(), view.samples(now - later, later - now)))
        if change is None:
            self._nft_marks = set(view.marks)
            return self.set_marks((view.marks - now) | later)
        if change["nftables"]:
            try:
                self._commit(change)
            except (KernelError, OSError):  # the table changed under us: write it whole
                marks = (view.marks - now) | later
                try:
                    self.nft.replace(marks, True)
                except KernelError:  # (someone deleted it: make it anew)
                    self.nft.replace(marks, False)
                self._nft_marks = set(marks)
                return
        view.apply(now, later)
        self.nft_exists, self.nft_intact = bool(view.marks), True

    def close(self) -> None:
        """Kept open for the next event (see :meth:`shutdown`)."""

    def shutdown(self) -> None:
        self._nftraw.close()
        super().close()

    def forget_foreign(self) -> None:
        """Another nft table changed: list the foreign mark bits again at the next event."""
        self.nft.remembered = None

    def forget_ours(self) -> None:
        """Someone else changed our table (or notifications were lost): list it again."""
        self.nft.view = None

    def set_marks(self, marks: Iterable[Mark]) -> None:
        marks = frozenset(marks)
        super().set_marks(marks)
        self.nft.view = nftdelta.MarkIndex(marks)  # committed in one transaction; a change by anyone else is notified


class Resident:
    """Makes the ResidentKernel on first use, in the engine's thread (libnftables binds to it)."""

    def __init__(self) -> None:
        self.kernel: Optional[ResidentKernel] = None
        self._lock = threading.Lock()

    def __call__(self) -> ResidentKernel:
        with self._lock:
            if self.kernel is None:
                self.kernel = ResidentKernel()
            return self.kernel

    def thread_id(self) -> Optional[int]:
        """The engine thread (its nft batches are its own changes, verified by the engine)."""
        kernel = self.kernel
        return kernel.thread_id if kernel is not None else None

    def portid(self) -> Optional[int]:
        """The engine's netlink socket (its rule and route changes are verified by the engine)."""
        kernel = self.kernel
        return kernel.netlink.portid if kernel is not None else None

    def forget_foreign(self) -> None:
        kernel = self.kernel
        if kernel is not None:
            kernel.forget_foreign()

    def forget_ours(self) -> None:
        kernel = self.kernel
        if kernel is not None:
            kernel.forget_ours()

    def forget_sysctls(self) -> None:
        kernel = self.kernel
        if kernel is not None:
            kernel.forget_sysctls()

    def forget_routes(self) -> None:
        kernel = self.kernel
        if kernel is not None:
            kernel.forget_routes()

    def forget_rules(self) -> None:
        kernel = self.kernel
        if kernel is not None:
            kernel.forget_rules()

    def forget_all(self) -> None:
        """A full re-sync (the safety net) reads everything from the kernel again."""
        for forget in (self.forget_foreign, self.forget_ours, self.forget_sysctls, self.forget_routes,
                       self.forget_rules):
            forget()

    def shutdown(self) -> None:
        with self._lock:
            if self.kernel is not None:
                self.kernel.shutdown()
                self.kernel = None


def trim_heap() -> None:
    """Give the memory a full re-sync used for a moment back to the system (glibc's malloc_trim):
    without it the daemon keeps the high-water mark of its largest reconcile."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
