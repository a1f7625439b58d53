"""The hook -> daemon handoff: a root-only unix socket on which the daemon takes one event and
answers once the kernel holds the verified result.

The dispatcher hook connects to ``handoff.sock`` in the state directory, writes one line
``ACTION<TAB>IFACE<TAB>UUID`` and waits (bounded, on its side) for one answer line:

- ``ok TEXT``: done and verified (or nothing to do); the hook returns;
- ``error TEXT``: the daemon tried and failed (it logged why and recorded it for
  ``status``); the hook returns, a standalone retry would fail the same way;
- ``fallback TEXT``: the daemon cannot act now (NetworkManager unreachable): the hook
  acts itself, as without a daemon.

Security: the socket is mode 0600 and the daemon checks the peer's credentials
(SO_PEERCRED): only root (or the daemon's own user) may ask. The request carries only
an action, an interface and a UUID; the daemon takes every fact from NetworkManager (its
replies and its own signals, nmmirror.py), so a forged request can at most make it
reconcile what NetworkManager already says.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Tuple

log = logging.getLogger(__name__)

SOCKET_NAME = "handoff.sock"
#: how long the daemon waits for a client's request line
READ_SECONDS = 2.0
MAX_LINE = 512
ENSURE = frozenset({"pre-up", "up", "dhcp4-change", "dhcp6-change", "reapply", "vpn-pre-up", "vpn-up"})
REMOVE = frozenset({"pre-down", "down", "vpn-pre-down", "vpn-down"})
_UUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}\Z")
_IFNAME = re.compile(r"[^\s/:]{1,15}\Z")


@dataclass(frozen=True)
class Request:
    """One dispatcher event, as the hook hands it over (nothing else is believed)."""

    action: str
    iface: str
    uuid: str

    def __str__(self) -> str:
        return f"{self.action} of {self.uuid} on {self.iface}"


def parse_request(line: bytes) -> Request:
    """``ACTION\\tIFACE\\tUUID`` -> Request; ValueError names what is wrong."""
    try:
        text = line.decode("ascii").rstrip("\n")
    except UnicodeDecodeError:
        raise ValueError("the request is not ASCII") from None
    parts = text.split("\t")
    if len(parts) != 3:
        raise ValueError(f"expected ACTION<TAB>IFACE<TAB>UUID, got {len(parts)} fields")
    action, iface, uuid = parts
    if action not in ENSURE | REMOVE:
        raise ValueError(f"action {action!r} is not a connection event")
    if not _IFNAME.match(iface):
        raise ValueError(f"{iface!r} is not an interface name")
    if not _UUID.match(uuid):
        raise ValueError(f"{uuid!r} is not a connection UUID")
    return Request(action, iface, uuid)


def peer_uid(sock: socket.socket) -> Optional[int]:
    """The connecting process's user id (SO_PEERCRED), None if the kernel does not say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid


Handler = Callable[[Request], Awaitable[Tuple[str, str]]]


class HandoffServer:
    """Serves ``handoff.sock`` in ``directory`` on the running asyncio loop."""

    def __init__(self, directory: str, handler: Handler) -> None:
        self.path = os.path.join(directory, SOCKET_NAME)
        self.handler = handler
        self._server: Optional[asyncio.AbstractServer] = None
        self._allowed = {0, os.geteuid()}

    async def start(self) -> None:
        try:
            os.unlink(self.path)  # a stale socket of a daemon that died: we hold daemon.lock now
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE * 2)
        log.info("taking dispatcher events on %s", self.path)

    def close(self) -> None:
        """Stop taking events: the hook then acts itself (it finds no socket)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            verdict, text = await self._answer(reader, writer.get_extra_info("socket"))
            writer.write(f"{verdict} {text}\n".encode("utf-8", "replace"))
            await writer.drain()
        except (ConnectionError, OSError) as exc:  # the hook gave up (its bound) or died
            log.warning("the dispatcher hook went away before its answer: %s", exc)
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, sock: Optional[socket.socket]) -> Tuple[str, str]:
        problem = "no request"
        try:  # read first (bounded) even from a peer to be refused: it then gets its answer
            line = await asyncio.wait_for(reader.readline(), READ_SECONDS)
        except (asyncio.TimeoutError, ValueError) as exc:
            line, problem = b"", str(exc) or "no request within the time allowed"
        uid = peer_uid(sock) if sock is not None else None
        if uid not in self._allowed:
            log.warning("refused a dispatcher event from uid %s on %s: only root may hand events over",
                        uid, self.path)
            return "error", "not permitted: only root may hand events to nm-policy-routing"
        try:
            request = parse_request(line) if line else None
        except ValueError as exc:
            request, problem = None, str(exc)
        if request is None:
            log.warning("refused a malformed dispatcher event on %s: %s", self.path, problem)
            return "error", f"malformed request: {problem}"
        return await self.handler(request)
