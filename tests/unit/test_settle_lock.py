"""The settle lock: one wait per connection, and its file goes with the last holder."""

from __future__ import annotations

import os
import time

from nm_policy_routing import settle


def test_lock_file_is_removed_by_its_holder(tmp_path) -> None:
    fd = settle._lock(str(tmp_path), "u1", time.monotonic() + 1)
    assert fd is not None and os.listdir(tmp_path) == ["settle-u1.lock"]
    settle._unlock(str(tmp_path), "u1", fd)
    assert os.listdir(tmp_path) == []


def test_a_second_wait_is_refused_while_the_first_holds(tmp_path) -> None:
    first = settle._lock(str(tmp_path), "u1", time.monotonic() + 1)
    assert settle._lock(str(tmp_path), "u1", time.monotonic() + 0.3) is None
    assert settle._lock(str(tmp_path), "u2", time.monotonic() + 0.3) is not None, "per connection"
    settle._unlock(str(tmp_path), "u1", first)


def test_a_waiter_on_a_removed_file_locks_the_current_one(tmp_path, monkeypatch) -> None:
    """A waiter opened the file before the holder removed it: it must not hold a lock on a
    file nobody else sees (two waits would run at once), but take the one at the path."""
    first = settle._lock(str(tmp_path), "u1", time.monotonic() + 1)
    stale = os.open(tmp_path / "settle-u1.lock", os.O_RDWR)
    settle._unlock(str(tmp_path), "u1", first)
    opened = []
    real_open = os.open

    def open_once_stale(path, flags, mode=0o777):
        if not opened:
            opened.append(path)
            return stale  # what the waiter had opened before the unlink
        return real_open(path, flags, mode)

    monkeypatch.setattr(settle.os, "open", open_once_stale)
    fd = settle._lock(str(tmp_path), "u1", time.monotonic() + 1)
    monkeypatch.undo()
    assert fd is not None and fd != stale
    assert os.fstat(fd).st_ino == os.stat(tmp_path / "settle-u1.lock").st_ino
    settle._unlock(str(tmp_path), "u1", fd)
