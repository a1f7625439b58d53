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
periodic check; a value we write is read back for real. Used from the daemon's one engine
thread only.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

from ..model import Fwmark, Mark, Sysctl
from . import nfnetlink, sysctl
from .kernel import LiveKernel
from .nftables import Nftables


class _RememberingNftables(Nftables):
    def __init__(self) -> None:
        super().__init__()
        self.remembered: Optional[List[Tuple[Fwmark, str]]] = None
        #: our table's marks as last listed or committed; None: list it again
        self.view: Optional[FrozenSet[Mark]] = None

    def foreign_marks(self) -> List[Tuple[Fwmark, str]]:
        marks = self.remembered
        if marks is None:
            marks = self.remembered = super().foreign_marks()
        return list(marks)

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


class ResidentKernel(LiveKernel):
    def __init__(self) -> None:
        super().__init__()
        self.nft = _RememberingNftables()
        #: the engine thread: nftables names it in the batches it commits
        self.thread_id = threading.get_native_id()
        #: sysctl values as last read (a value we write is read again, for the verify)
        self._sysctls: Dict[Tuple[str, str, str], int] = {}
        self._conntrack = nfnetlink.conntrack_socket()

    def flush_conntrack(self, mark: Fwmark) -> None:
        nfnetlink.flush_conntrack_mark(mark.value, mark.mask, self._conntrack)

    def read_sysctls(self, slots: Iterable[str]) -> Set[Sysctl]:
        out = set()
        for slot in slots:
            family, iface, key = slot.split("/")
            value = self.read_sysctl(family, iface, key)
            if value is not None:
                out.add(Sysctl(family, iface, key, value))
        return out

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

    def shutdown(self) -> None:
        with self._lock:
            if self.kernel is not None:
                self.kernel.shutdown()
                self.kernel = None
