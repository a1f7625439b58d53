"""daemon.lock: a lock file no other user can open (the hook steps aside only for it)."""

from __future__ import annotations

import fcntl
import os
import stat

import pytest

from nm_policy_routing import daemonlock
from nm_policy_routing.errors import PolicyRoutingError


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_new_lock_is_0600_whatever_the_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        fd = daemonlock.open_lock(str(tmp_path))
    finally:
        os.umask(old)
    os.close(fd)
    assert mode(daemonlock.path(str(tmp_path))) == 0o600


@pytest.mark.parametrize("kind", ["0644", "symlink"])
def test_a_lock_others_could_open_is_replaced_not_reused(tmp_path, kind: str) -> None:
    lock = daemonlock.path(str(tmp_path))
    target = str(tmp_path / "elsewhere")
    with open(target, "w") as handle:
        handle.write("keep")
    os.chmod(target, 0o644)
    if kind == "symlink":
        os.symlink(target, lock)
    else:
        os.link(target, lock)  # the same inode as a descriptor someone opened earlier
    other = os.open(target, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_SH)  # held by "someone else"
    try:
        fd = daemonlock.open_lock(str(tmp_path))
        daemonlock.acquire(fd, str(tmp_path))  # not blocked by the old file's holder
        assert not os.path.islink(lock) and mode(lock) == 0o600
        assert os.stat(lock).st_ino != os.stat(target).st_ino
        with open(target) as handle:
            assert handle.read() == "keep"  # the symlink's target was not touched
        assert mode(target) == 0o644
        assert daemonlock.held(str(tmp_path))
        os.close(fd)
    finally:
        os.close(other)


def test_held_ignores_a_lock_another_user_could_hold(tmp_path) -> None:
    lock = daemonlock.path(str(tmp_path))
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    os.fchmod(fd, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert not daemonlock.held(str(tmp_path))
        os.fchmod(fd, 0o600)
        assert daemonlock.held(str(tmp_path))
    finally:
        os.close(fd)


def test_a_directory_others_can_write_is_refused(tmp_path) -> None:
    os.chmod(tmp_path, 0o777)
    with pytest.raises(PolicyRoutingError, match="chmod 0755"):
        daemonlock.open_lock(str(tmp_path))
    assert not os.path.exists(daemonlock.path(str(tmp_path)))
