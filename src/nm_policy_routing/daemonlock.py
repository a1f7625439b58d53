"""The daemon's presence lock (``daemon.lock``), which only root can hold.

While the daemon follows NetworkManager it holds an exclusive ``flock`` on
``daemon.lock`` in the state directory; the dispatcher hook sees the lock held and
leaves the work to the daemon. ``flock`` needs only a read-only descriptor, so the
lock file must be one that no other user can open: a regular file of ours, mode
0600, in a directory of ours that nobody else can write. A lock file that is not
(a symlink, another owner, a wider mode, e.g. 0644 from an older version) is
replaced by a fresh one: whoever holds a descriptor to the old one holds nothing.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import tempfile
import time
from typing import Optional

from .errors import PolicyRoutingError

log = logging.getLogger(__name__)

NAME = "daemon.lock"


def path(directory: str) -> str:
    return os.path.join(directory, NAME)


def _untrusted(st: os.stat_result) -> Optional[str]:
    """Why this lock file could be held by someone else; None if it cannot."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    if stat.S_IMODE(st.st_mode) != 0o600:
        return f"mode {stat.S_IMODE(st.st_mode):04o}, not 0600"
    return None


def check_directory(directory: str) -> None:
    """The state directory must be ours and writable by nobody else (else anyone could plant a lock)."""
    st = os.stat(directory)
    group_writable = st.st_mode & 0o020 and st.st_gid not in (0, os.getegid())
    if st.st_uid != os.geteuid() or st.st_mode & 0o002 or group_writable:
        raise PolicyRoutingError(
            f"the state directory {directory} is owned by uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):04o}: another user could plant daemon.lock there and switch the "
            f"dispatcher hook off; make it root's and 0755 (chown root:root {directory}; chmod 0755 {directory})")


def open_lock(directory: str) -> int:
    """A descriptor of a lock file only we can open, created or replaced as needed."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    check_directory(directory)
    target = path(directory)
    while True:
        try:
            fd = os.open(target, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue  # made meanwhile by another starting daemon: open that one
            os.fchmod(fd, 0o600)  # whatever the umask
            return fd
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            why = "a symlink"
        else:
            why = _untrusted(os.fstat(fd))
            if why is None:
                return fd
            os.close(fd)
        log.warning("replacing %s (%s): another user could hold it and switch the dispatcher hook off",
                    target, why)
        return _replace(directory, target)


def _replace(directory: str, target: str) -> int:
    fd, tmp = tempfile.mkstemp(prefix=".daemon.lock.", dir=directory)  # 0600, O_EXCL
    try:
        os.replace(tmp, target)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd


def acquire(fd: int, directory: str) -> None:
    """Take the exclusive lock; retry briefly (the hook takes it for an instant to test it)."""
    for _ in range(20):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.05)
    else:
        raise PolicyRoutingError(f"another nm-policy-routing daemon already runs (lock {path(directory)} "
                                 "is held); stop it first ('systemctl stop nm-policy-routing')")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def held(directory: str) -> bool:
    """Does a daemon hold the lock? Only a lock file no other user could open counts.

    A caller who may not open it (not root) cannot tell: it gets True, as it could not
    reconcile by itself anyway (``set`` then leaves the work to the daemon)."""
    try:
        fd = os.open(path(directory), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 and st.st_uid != os.geteuid() or \
                stat.S_IMODE(st.st_mode) != 0o600:
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
