"""Which waited-for cgroup directories appeared: inotify on the deepest existing ancestor of each.

A policy's ``apps`` may list a ``cgroup:/PATH`` that does not exist yet (a cgroup made by
something other than systemd: systemd's units are followed by their ``JobRemoved``, daemon.py).
The directory's parent, or the deepest ancestor that exists, is watched for new
subdirectories (``mkdir`` in the cgroup2 tree goes through the VFS, which notifies); each
event re-arms the watches one level deeper until the directory itself exists. No library:
ctypes and libc's inotify calls.
"""

from __future__ import annotations

import ctypes
import os
from typing import Dict, Iterable, Optional, Set

IN_MOVED_TO, IN_CREATE, IN_ONLYDIR = 0x80, 0x100, 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


class CgroupWatch:
    """``arm(paths)`` watches for these directories; when the fd is readable, ``appeared()``
    drains the events and says whether one of them exists now (it re-arms what remains)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._wanted: Set[str] = set()
        self._watches: Dict[str, int] = {}  # watched ancestor -> watch descriptor

    def arm(self, paths: Iterable[str]) -> bool:
        """Watch for ``paths``; True if one of them exists already (nothing to wait for)."""
        self._wanted = {os.path.normpath(p) for p in paths}
        if any(os.path.isdir(p) for p in self._wanted):
            return True
        ancestors = {a for a in (_deepest_existing(p) for p in self._wanted) if a is not None}
        for gone in set(self._watches) - ancestors:
            self._libc.inotify_rm_watch(self.fd, self._watches.pop(gone))
        for ancestor in ancestors - set(self._watches):
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(ancestor), IN_CREATE | IN_MOVED_TO | IN_ONLYDIR)
            if wd >= 0:
                self._watches[ancestor] = wd
        return False

    def appeared(self) -> bool:
        """Drain the pending events; True if a waited-for directory exists now."""
        while True:
            try:
                if not os.read(self.fd, 65536):
                    break
            except BlockingIOError:
                break
        return self.arm(self._wanted)

    @property
    def waiting(self) -> Set[str]:
        return set(self._wanted)

    def close(self) -> None:
        os.close(self.fd)


def _deepest_existing(path: str) -> Optional[str]:
    parent = os.path.dirname(path)
    while parent and not os.path.isdir(parent):
        if parent == os.path.dirname(parent):
            return None
        parent = os.path.dirname(parent)
    return parent or None
