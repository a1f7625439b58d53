"""The record's files: ``state.json`` and the saves since it was last written whole, each file
written atomically.

``state.d/event.<n>`` holds what one save changed (one event's entries, all or none of them),
with the stamp (inode, size, mtime) of the ``state.json`` it applies to; the files apply in
the order of ``n``, and an entry without a value was removed. (0.3.0 wrote one file per entry,
``state.d/<section>.<key>``: read as older than any event file.) The lock file's first 8 bytes
count the saves. What the entries mean and how they are checked is record.py's job.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

#: the directory of the files saved since the last full save
OVERLAYS = "state.d"
EVENT = "event."


class Tracked(dict):
    """A section of the record that remembers which keys changed since the last save."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed: set = set()

    def __setitem__(self, key: str, value: Any) -> None:
        self.changed.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.changed.add(key)
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self.changed.add(key)
        return super().pop(key, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        new = dict(*args, **kwargs)
        self.changed.update(new)
        super().update(new)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def popitem(self) -> Any:
        key, value = super().popitem()
        self.changed.add(key)
        return key, value

    def clear(self) -> None:
        self.changed.update(self)
        super().clear()


Stamp = Tuple[int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def event_name(seq: int) -> str:
    return f"{EVENT}{seq:012d}"


def event_seq(name: str) -> int:
    """The order of a file in state.d (0: 0.3.0's per-entry files, older than any event)."""
    return int(name[len(EVENT):]) if name.startswith(EVENT) else 0


Entry = Dict[str, Any]


def read_overlays(directory: str, base: Optional[Stamp],
                  sections: Sequence[str]) -> Tuple[List[Tuple[str, List[Entry]]], set]:
    """(name, entries) of the files that apply to ``base``, in the order they were saved, and the
    names of stale ones. An unreadable file makes the record damaged (ValueError)."""
    found: List[Tuple[int, str, List[Entry]]] = []
    stale = set()
    try:
        names = os.listdir(os.path.join(directory, OVERLAYS))
    except FileNotFoundError:
        return [], stale
    for name in names:
        if name.startswith("."):
            continue  # a temp file of a save that did not finish
        with open(os.path.join(directory, OVERLAYS, name)) as handle:
            item = json.load(handle)
        entries = (item.get("entries") if name.startswith(EVENT) else [item]) if isinstance(item, dict) else None
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and e.get("section") in sections and isinstance(e.get("key"), str)
                for e in entries):
            raise ValueError(f"{OVERLAYS}/{name} is not a record entry")
        if base is None or item.get("base") != list(base):
            stale.add(name)
        else:
            found.append((event_seq(name), name, entries))
    found.sort()
    return [(name, entries) for _, name, entries in found], stale


def write_atomic(directory: str, name: str, text: str) -> None:
    """``name`` holds ``text`` or what it held before, whatever happens (temp file, fsync, rename;
    the temp file's name is the writer's own: every writer holds the lock)."""
    tmp = os.path.join(directory, f".state.{name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            data = memoryview(text.encode())
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_leftovers(directory: str) -> None:
    """Remove the temp files of saves that were interrupted (killed): the caller holds the lock,
    so no save is under way."""
    for folder in (directory, os.path.join(directory, OVERLAYS)):
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith(".state."):
                try:
                    os.unlink(os.path.join(folder, name))
                except FileNotFoundError:
                    pass


def generation(directory: str) -> int:
    """How many saves the record of ``directory`` has seen (kept in the lock file; 0: none known)."""
    try:
        with open(os.path.join(directory, "lock"), "rb") as handle:
            raw = handle.read(8)
    except OSError:
        return 0
    return int.from_bytes(raw, "little") if len(raw) == 8 else 0


def count_save(directory: str) -> None:
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        raw = os.pread(fd, 8, 0)
        count = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        os.pwrite(fd, ((count + 1) & (2 ** 64 - 1)).to_bytes(8, "little"), 0)
    finally:
        os.close(fd)


def apply_overlays(data: Any, overlays: Iterable[List[Entry]]) -> None:
    """Put the saved entries into the record's content, in order (an entry without a value was removed)."""
    if not isinstance(data, dict):
        return  # damage() reports it
    for entries in overlays:
        for item in entries:
            section = data.setdefault(item["section"], {})
            if not isinstance(section, dict):
                return
            if "value" in item:
                section[item["key"]] = item["value"]
            else:
                section.pop(item["key"], None)
