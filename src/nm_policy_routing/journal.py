"""Log to the systemd journal natively: one entry per event, filterable by connection.

Under systemd, stderr is already the journal (``JOURNAL_STREAM`` names it): logging to
stderr and to syslog as well would store every line twice. So the daemon and the hook
log to the journal's native datagram socket alone, with the connection as fields, as
NetworkManager's own messages carry them (``CONNECTION_UUID``, ``CONNECTION_ID``,
``NM_DEVICE``): ``journalctl -u nm-policy-routing CONNECTION_UUID=...`` then tells one
connection's story. Outside systemd, stderr (and syslog when there is one) as before.

A log call names its connection with ``extra=about(conn)``; the text names it too
(``named(conn)``), so a plain log file says the same as the journal's fields.
"""

from __future__ import annotations

import _socket  # not socket: its enums cost the hook ~4 ms at every event
import logging
import os
import stat
import struct
import sys
from typing import Any, Dict, List, Optional, Tuple

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "nm-policy-routing"
#: logging level -> syslog priority (journal PRIORITY=)
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
#: record attribute -> journal field (set by ``about``)
FIELDS = (("npr_connection_uuid", "CONNECTION_UUID"), ("npr_connection_id", "CONNECTION_ID"),
          ("npr_device", "NM_DEVICE"))


def named(conn: Any) -> str:
    """``connection 'id' (uuid) on iface``: how every message names a connection."""
    iface = getattr(conn, "iface", "") or "-"
    return f"connection '{conn.id}' ({conn.uuid}) on {iface}"


def about(conn: Any) -> Dict[str, str]:
    """``extra=`` for a log call about ``conn`` (anything with uuid, id, iface)."""
    extra = {"npr_connection_uuid": conn.uuid, "npr_connection_id": conn.id or conn.uuid}
    if getattr(conn, "iface", ""):
        extra["npr_device"] = conn.iface
    return extra


def priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def encode(fields: List[Tuple[str, str]]) -> bytes:
    """The native protocol: ``NAME=value\\n``, or for a value with a newline
    ``NAME\\n`` + its length (64-bit little endian) + value + ``\\n``."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record as one journal entry; falls back to stderr if the socket refuses."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, 1 << 20)

    def fields(self, record: logging.LogRecord) -> List[Tuple[str, str]]:
        fields = [("MESSAGE", self.format(record)), ("PRIORITY", str(priority(record.levelno))),
                  ("SYSLOG_IDENTIFIER", self.identifier), ("CODE_FILE", record.pathname),
                  ("CODE_LINE", str(record.lineno)), ("CODE_FUNC", record.funcName),
                  ("LOGGER", record.name)]
        for attribute, name in FIELDS:
            value = getattr(record, attribute, None)
            if value:
                fields.append((name, str(value)))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(encode(self.fields(record)), self.path)
        except OSError as exc:  # journald gone or the entry too large: never lose the line
            sys.stderr.write(f"{record.levelname} {self.format(record)} (journal: {exc.strerror})\n")
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def stderr_is_journal(environ: Optional[Dict[str, str]] = None) -> bool:
    """stderr is connected to the journal: ``JOURNAL_STREAM=dev:inode`` matches fd 2 (a service);
    or, for the dispatcher hook (nm-dispatcher gives scripts a clean environment, without
    ``JOURNAL_STREAM``), stderr is a socket while the journal runs."""
    env = os.environ if environ is None else environ
    try:
        st = os.fstat(2)
    except OSError:
        return False
    stream = env.get("JOURNAL_STREAM", "")
    if stream:
        dev, _, inode = stream.partition(":")
        return dev.isdigit() and inode.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(inode))
    return stat.S_ISSOCK(st.st_mode) and os.path.exists(JOURNAL_SOCKET)


def handlers(service: bool) -> List[logging.Handler]:
    """Where ``dispatch`` and ``daemon`` (``service``) or other commands log."""
    if service and stderr_is_journal() and os.path.exists(JOURNAL_SOCKET):
        handler: logging.Handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        return [handler]
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    out: List[logging.Handler] = [stderr]
    if service and os.path.exists(JOURNAL_SOCKET):
        journal = JournalHandler()
        journal.setFormatter(logging.Formatter("%(message)s"))
        out.append(journal)
    elif service and os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler

        syslog = SysLogHandler(address="/dev/log")
        syslog.ident = IDENTIFIER + ": "
        syslog.setFormatter(logging.Formatter("%(message)s"))
        out.append(syslog)
    return out
