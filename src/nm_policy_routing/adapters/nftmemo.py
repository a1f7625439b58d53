"""What the nftables ruleset held at our last look, remembered from one hook run to the next.

Two views: the other tables' use of marks (listing the whole ruleset costs a forked child,
nftables.py: libnftables may crash on it) and our own table's marking entries (listing it
loads libnftables, ~5-8 ms of a hook run that then finds nothing to change). They are kept
in the state directory (``nft-memo.json``) with the ruleset's generation
(nfnetlink.nft_generation), which every committed transaction in the namespace moves on by
one, and believed while the generation is the kept one plus the transactions we committed
since (ours change our table, and the view of it follows what we wrote): then nobody else
committed. The key also names the network namespace and the boot, so that a state
directory outliving either is never believed.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..errors import KernelError
from ..model import Fwmark, Mark

log = logging.getLogger(__name__)

FILE = "nft-memo.json"
Foreign = Tuple[List[Tuple[Fwmark, str]], List[str], List[Tuple[int, str]]]
Ours = Tuple[Set[Mark], bool, bool]


class NftMemo:
    """``foreign()`` and ``our_marks()`` answer as ``Nftables``'s do (from the memo when it holds);
    ``wrote()`` follows our commits; ``save()`` (at the kernel's close) keeps the views."""

    def __init__(self, directory: str, nft: Any, generation: Callable[[], int]) -> None:
        self.path = os.path.join(directory, FILE)
        self.nft = nft
        self._generation = generation
        #: generation and our commit count then, and the views as of that generation
        self._gen: Optional[int] = None
        self._commits = 0
        self._foreign: Optional[Foreign] = None
        self._ours: Optional[Ours] = None
        self._loaded = False

    def _now(self) -> Optional[int]:
        try:
            return self._generation()
        except (KernelError, OSError) as exc:
            log.debug("no nftables generation (%s): the ruleset is listed", exc)
            return None

    def _holds(self) -> Optional[int]:
        """The generation now if the views still describe the ruleset (None: forget them)."""
        if not self._loaded:
            self._loaded = True
            self._load()
        now = self._now()
        if now is None or self._gen is None or now != self._gen + self.nft.commits - self._commits:
            self._gen, self._foreign, self._ours = None, None, None
        return now

    def _restart(self, now: Optional[int]) -> None:
        """A fresh listing at generation ``now``: it starts the views if they were forgotten."""
        if self._gen is None and now is not None:
            self._gen, self._commits = now, self.nft.commits

    def foreign(self) -> Foreign:
        now = self._holds()
        if self._foreign is not None:
            return self._foreign
        answer = self.nft.foreign()
        if self.nft.listed:  # a crashed listing is not kept
            self._restart(now)
            if self._gen is not None:
                self._foreign = answer
        return answer

    def our_marks(self) -> Ours:
        now = self._holds()
        if self._ours is not None:
            marks, intact, exists = self._ours
            return set(marks), intact, exists
        answer = self.nft.our_marks()
        self._restart(now)
        if self._gen is not None:
            self._ours = (set(answer[0]), answer[1], answer[2])
        return answer

    def wrote(self, marks: Set[Mark]) -> None:
        """We committed our table to hold ``marks`` (written whole or element by element)."""
        if self._ours is not None:
            self._ours = (set(marks), True, bool(marks))

    def save(self) -> None:
        if self._gen is None and not self._loaded:
            return
        now = self._holds()
        if now is None or self._gen is None or (self._foreign is None and self._ours is None):
            return
        data: Dict[str, Any] = {"key": _key(now)}
        if self._foreign is not None:
            marks, writers, early = self._foreign
            data["foreign"] = {"marks": [[m.value, m.mask, who] for m, who in marks], "writers": list(writers),
                               "early_rpfilter": [list(e) for e in early]}
        if self._ours is not None:
            ours, intact, exists = self._ours
            data["ours"] = {"marks": sorted([m.direction, m.iface, m.value, m.mask] for m in ours),
                            "intact": intact, "exists": exists}
        temp = f"{self.path}.{os.getpid()}"
        try:
            with open(temp, "w") as handle:
                json.dump(data, handle)
            os.replace(temp, self.path)
        except OSError as exc:
            log.debug("cannot keep the nftables views (%s)", exc)

    def _load(self) -> None:
        try:
            with open(self.path) as handle:
                data = json.load(handle)
            key = data["key"]
            if key[:-1] != _key(0)[:-1]:
                return
            foreign, ours = data.get("foreign"), data.get("ours")
            self._foreign = None if foreign is None else (
                [(Fwmark(value, mask), who) for value, mask, who in foreign["marks"]], list(foreign["writers"]),
                [(family, who) for family, who in foreign["early_rpfilter"]])
            self._ours = None if ours is None else (
                {Mark(*entry) for entry in ours["marks"]}, bool(ours["intact"]), bool(ours["exists"]))
            self._gen, self._commits = int(key[-1]), self.nft.commits
        except (OSError, ValueError, TypeError, KeyError, IndexError):
            self._gen, self._foreign, self._ours = None, None, None


def _key(generation: int) -> List[Any]:
    with open("/proc/sys/kernel/random/boot_id") as handle:
        boot = handle.read().strip()
    return [2, boot, os.stat("/proc/self/ns/net").st_ino, generation]
