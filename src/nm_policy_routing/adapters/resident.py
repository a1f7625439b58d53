"""The daemon's resident kernel: one LiveKernel kept open across engine calls.

One netlink socket and one libnftables context serve every event (no socket set-up per
event), and the mark bits other nft tables write are listed once and remembered until
the daemon's nftables watch reports a change to a table that is not ours (or the
periodic check runs): that listing forks a child and reads the whole ruleset, the
most expensive read of an event. Used from the daemon's one engine thread only.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Tuple

from ..model import Fwmark
from .kernel import LiveKernel
from .nftables import Nftables


class _RememberingNftables(Nftables):
    def __init__(self) -> None:
        super().__init__()
        self.remembered: Optional[List[Tuple[Fwmark, str]]] = None

    def foreign_marks(self) -> List[Tuple[Fwmark, str]]:
        marks = self.remembered
        if marks is None:
            marks = self.remembered = super().foreign_marks()
        return list(marks)


class ResidentKernel(LiveKernel):
    def __init__(self) -> None:
        super().__init__()
        self.nft = _RememberingNftables()

    def close(self) -> None:
        """Kept open for the next event (see :meth:`shutdown`)."""

    def shutdown(self) -> None:
        super().close()

    def forget_foreign(self) -> None:
        """Another nft table changed: list the foreign mark bits again at the next event."""
        self.nft.remembered = None


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

    def forget_foreign(self) -> None:
        kernel = self.kernel
        if kernel is not None:
            kernel.forget_foreign()

    def shutdown(self) -> None:
        with self._lock:
            if self.kernel is not None:
                self.kernel.shutdown()
                self.kernel = None
