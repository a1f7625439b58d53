"""Per-interface sysctls (src_valid_mark, rp_filter) in the current network namespace.

The interface name goes into a path: it is validated by the planner (no '/', at
most 15 characters) and checked again here; dots stay dots (``eth1.100``).
"""

from __future__ import annotations

import errno
import os
import re
from typing import Optional

from ..errors import KernelError, NotPermittedError
from ..model import Sysctl

ROOT = "/proc/sys/net"
_IFNAME = re.compile(r"[^\s/:]{1,15}\Z")
_KEYS = {"src_valid_mark", "rp_filter"}


def path(family: str, iface: str, key: str) -> str:
    if family not in ("ipv4", "ipv6") or key not in _KEYS or not _IFNAME.match(iface) \
            or iface in (".", ".."):
        raise KernelError(f"refusing sysctl path for family={family!r} iface={iface!r} key={key!r}")
    return os.path.join(ROOT, family, "conf", iface, key)


def read(family: str, iface: str, key: str) -> Optional[int]:
    """The current value, or None when the interface does not exist (any more)."""
    try:  # os.open/os.read: no buffered text file per value (hundreds are read in a reconcile)
        fd = os.open(path(family, iface, key), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return int(os.read(fd, 64))
    finally:
        os.close(fd)


def write(entry: Sysctl) -> None:
    try:
        fd = os.open(path(entry.family, entry.iface, entry.key), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"%d\n" % entry.value)
        finally:
            os.close(fd)
    except FileNotFoundError as exc:
        raise KernelError(f"cannot set {entry.name}: interface {entry.iface} does not exist") from exc
    except PermissionError as exc:
        raise NotPermittedError(f"cannot set {entry.name}: not permitted (run as root)") from exc
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS):
            raise NotPermittedError(f"cannot set {entry.name}: {exc.strerror} (run as root)") from exc
        raise KernelError(f"cannot set {entry.name}: {exc.strerror}") from exc
