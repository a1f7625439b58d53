"""The other nftables tables' use of marks, remembered from one hook run to the next.

Listing the whole ruleset costs a forked child at every event (nftables.py: libnftables
may crash on it), ~3-5 ms of the hook's. The answer is kept in the state directory
(``foreign-nft.json``) with the ruleset's generation (nfnetlink.nft_generation), which
every committed transaction in the namespace moves on by one; it is used again while the
generation is the one kept. It is kept only when the generation moved by exactly our
own commits since the listing (they change only our table, which the answer leaves out):
then nobody else committed meanwhile. The key also names the network namespace and the
boot, so that a state directory outliving either is never believed.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, List, Optional, Tuple

from ..errors import KernelError
from ..model import Fwmark

log = logging.getLogger(__name__)

FILE = "foreign-nft.json"
Foreign = Tuple[List[Tuple[Fwmark, str]], List[str], List[Tuple[int, str]]]


class ForeignCache:
    """``foreign()`` answers as ``Nftables.foreign`` does; ``save()`` (at the kernel's close) keeps
    the answer for the next run when no one else committed meanwhile."""

    def __init__(self, directory: str, nft: Any, generation: Callable[[], int]) -> None:
        self.path = os.path.join(directory, FILE)
        self.nft = nft
        self.generation = generation
        #: (generation, our commits then, answer) of the answer given
        self._given: Optional[Tuple[int, int, Foreign]] = None

    def foreign(self) -> Foreign:
        try:
            generation = self.generation()
        except (KernelError, OSError) as exc:
            log.debug("no nftables generation (%s): the ruleset is listed", exc)
            return self.nft.foreign()
        answer = self._load(generation)
        if answer is None:
            answer = self.nft.foreign()
            if not self.nft.listed:  # the listing crashed: nothing to keep
                return answer
        self._given = (generation, self.nft.commits, answer)
        return answer

    def save(self) -> None:
        if self._given is None:
            return
        generation, commits, answer = self._given
        self._given = None
        try:
            now = self.generation()
        except (KernelError, OSError):
            return
        if now != generation + self.nft.commits - commits:  # someone else committed meanwhile
            return
        marks, writers, early = answer
        temp = f"{self.path}.{os.getpid()}"
        try:
            data = {"key": _key(now), "marks": [[m.value, m.mask, who] for m, who in marks],
                    "writers": list(writers), "early_rpfilter": [list(e) for e in early]}
            with open(temp, "w") as handle:
                json.dump(data, handle)
            os.replace(temp, self.path)
        except OSError as exc:
            log.debug("cannot keep the foreign nftables usage (%s)", exc)

    def _load(self, generation: int) -> Optional[Foreign]:
        try:
            with open(self.path) as handle:
                data = json.load(handle)
            if data.get("key") != _key(generation):
                return None
            return ([(Fwmark(value, mask), who) for value, mask, who in data["marks"]], list(data["writers"]),
                    [(family, who) for family, who in data["early_rpfilter"]])
        except (OSError, ValueError, TypeError, KeyError):
            return None


def _key(generation: int) -> List[Any]:
    with open("/proc/sys/kernel/random/boot_id") as handle:
        boot = handle.read().strip()
    return [1, boot, os.stat("/proc/self/ns/net").st_ino, generation]
