"""The hook's wait for duplicate address detection, handed to a detached, bounded process.

NetworkManager reports ``up`` while an IPv6 address may still be tentative; the reconcile
leaves such addresses out, and without a daemon nothing would call us again. The hook
starts ``python -m nm_policy_routing.settle DIR UUID`` in its own session (no pipes to
the dispatcher, which goes on at once). It polls the kernel's address flags, and when
none of the connection's recorded addresses is tentative any more it re-applies the
recorded connections under the usual lock. It gives up after ``SETTLE_SECONDS``, stops at
once if the connection was removed meanwhile, and one settle per connection runs at a time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from typing import List, Optional

log = logging.getLogger(__name__)

SETTLE_SECONDS = 60.0
POLL_SECONDS = 0.2


def start(directory: str, uuid: str) -> None:
    """Start a settle for ``uuid`` and return at once (the hook must not wait for it)."""
    try:
        subprocess.Popen([sys.executable, "-m", "nm_policy_routing.settle", directory, uuid],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError as exc:
        log.error("connection %s: cannot start the wait for its tentative addresses (%s); run "
                  "'nm-policy-routing apply' once they are ready", uuid, exc)


def _lock_path(directory: str, uuid: str) -> str:
    return os.path.join(directory, f"settle-{uuid}.lock")


def _lock(directory: str, uuid: str, deadline: float) -> Optional[int]:
    """One settle per connection: a later one waits for the earlier to finish (bounded).
    The holder unlinks the file when it is done (nothing stays in the state directory), so a
    lock taken on a file that is no longer the one at the path is taken again on the new one."""
    path = _lock_path(directory, uuid)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    return None
                time.sleep(POLL_SECONDS)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed it meanwhile: lock the current file


def _unlock(directory: str, uuid: str, fd: int) -> None:
    try:
        os.unlink(_lock_path(directory, uuid))
    except FileNotFoundError:
        pass
    os.close(fd)


def _still_waiting(directory: str, uuid: str) -> Optional[List[str]]:
    """The connection's recorded addresses that are still unusable; None if it is gone."""
    from .adapters.rtnl import Rtnl
    from .record import Record

    conn = Record.load(directory).connections().get(uuid)
    if conn is None:
        return None
    netlink = Rtnl()
    try:
        unusable = netlink.unusable_addresses()
    finally:
        netlink.close()
    return [a.ip for a in conn.addresses if a.ip in unusable]


def settle(directory: str, uuid: str, seconds: float = SETTLE_SECONDS) -> str:
    from .reconcile import Engine

    deadline = time.monotonic() + seconds
    fd = _lock(directory, uuid, deadline)
    if fd is None:
        return f"connection {uuid}: another wait for its addresses is still running"
    try:
        while True:
            waiting = _still_waiting(directory, uuid)
            if waiting is None:
                return f"connection {uuid} went down meanwhile: nothing to do"
            if not waiting:
                result = Engine(directory).reconcile()  # the recorded connections, under the lock
                if uuid not in result.waiting:
                    cp = result.plan_of(uuid)
                    return (f"connection {cp.connection.label if cp else uuid}: its addresses are ready, "
                            f"policy re-applied ({cp.status if cp else 'gone'})")
            if time.monotonic() > deadline:
                log.warning("connection %s: addresses %s still not usable after %.0f s (duplicate address "
                            "detection failed?); their part of the policy is not installed. Run "
                            "'nm-policy-routing apply' when they are.", uuid, ", ".join(waiting), seconds)
                return f"connection {uuid}: gave up waiting"
            time.sleep(POLL_SECONDS)
    finally:
        _unlock(directory, uuid, fd)


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import _setup_logging
    from .errors import PolicyRoutingError

    directory, uuid = (argv or sys.argv[1:])[:2]
    _setup_logging(False, service=True)
    try:
        log.info("%s", settle(directory, uuid))
    except PolicyRoutingError as exc:
        log.error("connection %s: re-applying after duplicate address detection failed: %s", uuid, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
