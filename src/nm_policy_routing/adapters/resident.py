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
else, lost notifications, or the periodic check. Sysctl values are remembered as read
(one file per interface and key), forgotten when a link appears or comes up and at the
periodic check; a value we write is read back for real. Rules and routes: the last dump,
kept current by our own acknowledged changes, the routes of each table we change read
back at the next read (a dump the kernel filters by table), everything dumped again
when the netlink watch reports a link or address change, someone else's rule or route
change, lost notifications, or at the periodic check. Used from the daemon's one engine
thread only.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

from ..model import RT_PROTO, Fwmark, Mark, Route, Rule, Sysctl
from . import nfnetlink, sysctl
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
        self.view: Optional[FrozenSet[Mark]] = None

    def foreign(self):
        """(marks, writers, early reverse-path filters) of the other nft tables, as last listed."""
        found = self.remembered
        if found is None:
            found = self.remembered = super().foreign()
        return tuple(list(part) for part in found)

    def our_marks(self) -> Tuple[Set[Mark], bool, bool]:
        view = self.view
        if view is not None:
            return set(view), True, bool(view)
        marks, intact, exists = super().our_marks()
        self.view = frozenset(marks) if intact else None
        return marks, intact, exists

    def replace(self, marks: Iterable[Mark], exists: bool) -> None:
        marks = frozenset(marks)
        self.view = None
        super().replace(marks, exists)
        self.view = marks

    def change(self, cmd: Dict[str, Any]) -> None:
        self.view = None  # set again by the caller's next listing or replace
        super().change(cmd)


class _RememberingRtnl(Rtnl):
    """Our rules (with the foreign ones) and routes as last read, kept current by our own
    acknowledged changes; the routes of a table we changed are read back (a dump the kernel
    filters by table: O(1)) at the next read, or all of ours by one dump when many changed."""

    def __init__(self) -> None:
        super().__init__()
        self.forget_rules = False
        self.forget_routes = False
        self._routes_view: Optional[Set[Route]] = None
        self._touched: Set[int] = set()

    def invalidate(self) -> None:
        if self.forget_rules:
            self.forget_rules = False
            self._rule_dump.clear()

    def rules_changed(self, added: Sequence[Rule], deleted: Sequence[Rule]) -> None:
        for family, dump in self._rule_dump.items():
            gone = {(r, RT_PROTO) for r in deleted if r.family == family}
            if gone:
                dump[:] = [entry for entry in dump if entry not in gone]
            have = set(dump)
            for rule in added:
                if rule.family == family and (rule, RT_PROTO) not in have:
                    have.add((rule, RT_PROTO))
                    dump.append((rule, RT_PROTO))

    def add_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        self._touched.update(r.table for r in routes)
        return super().add_routes(routes)

    def del_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        self._touched.update(r.table for r in routes)
        return super().del_routes(routes)

    def our_routes(self) -> Set[Route]:
        if self.forget_routes or self._routes_view is None:
            self.forget_routes = False
            self._touched = set()
            self._routes_view = super().our_routes()
        elif len(self._touched) > TABLES_READ_ONE_BY_ONE:  # many changed (a full reconcile): one dump
            self._touched = set()
            self._routes_view = super().our_routes()
        elif self._touched:
            tables, self._touched = self._touched, set()
            view = {r for r in self._routes_view if r.table not in tables}
            for table in sorted(tables):
                for family in (4, 6):
                    view.update(r for r, proto in self._routes(family, table=table) if proto == RT_PROTO)
            self._routes_view = view
        return set(self._routes_view)


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

    def flush_conntrack(self, mark: Fwmark) -> None:
        nfnetlink.flush_conntrack_mark(mark.value, mark.mask, self._conntrack)

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

    def close(self) -> None:
        """Kept open for the next event (see :meth:`shutdown`)."""

    def shutdown(self) -> None:
        self._conntrack.close()
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
        self.nft.view = marks  # committed in one transaction; a change by anyone else is notified


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
