"""The standalone hook's synchronous client of the system bus: no asyncio, no dbus-next.

A unix socket to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` as dbus-next reads it, else
the standard path), AUTH EXTERNAL, Hello, then method calls: the calls of one step go out
together and their replies are matched by serial (the wire format is dbuswire.py's). Every
call has a deadline: whatever does not answer in time yields a NetworkManagerError naming
the call. It answers nmfacts' steps as NetworkManagerBus does for the daemon.
"""

from __future__ import annotations

import _socket
import os
from time import monotonic
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import NetworkManagerError
from . import nmfacts
from .dbuswire import (ERROR, ERROR_NAME, METHOD_RETURN, REPLY_SERIAL, Malformed, Message, message_length,
                       method_call, parse)

DEFAULT_ADDRESS = "unix:path=/var/run/dbus/system_bus_socket"
_TIMEOUT = (TimeoutError, getattr(_socket, "timeout", TimeoutError))


def addresses(text: str) -> List[str]:
    """``unix:path=/x;unix:abstract=y,guid=...`` -> socket addresses to try, in order."""
    out = []
    for entry in text.split(";"):
        transport, _, params = entry.partition(":")
        keys = dict(p.partition("=")[::2] for p in params.split(",") if p)
        if transport != "unix":
            continue
        if "path" in keys:
            out.append(_unescape(keys["path"]))
        elif "abstract" in keys:
            out.append("\0" + _unescape(keys["abstract"]))
    return out


def _unescape(text: str) -> str:
    parts = text.split("%")
    return parts[0] + "".join(chr(int(p[:2], 16)) + p[2:] for p in parts[1:])


Call = Tuple[str, str, str, str, str, Sequence[Any]]  # destination, path, interface, member, signature, body


class WireBus:
    """A connection to the system bus; ``calls`` sends method calls together. The handshake
    (AUTH EXTERNAL, BEGIN, Hello) goes out with the first calls, in one write, as sd-bus
    pipelines it: connecting costs no round trip of its own."""

    def __init__(self) -> None:
        self.sock: Any = None
        self.serial = 0
        self.buf = bytearray()
        self.greeting = b""
        self.connect_timeout = nmfacts.CONNECT_TIMEOUT

    def connect(self, timeout: float = nmfacts.CONNECT_TIMEOUT, address: Optional[str] = None) -> "WireBus":
        text = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_ADDRESS
        error = None
        for where in addresses(text):
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(timeout)
                sock.connect(where)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            self.sock = sock
            break
        if self.sock is None:
            raise nmfacts.unreachable(error or f"no unix socket in the address {text!r}")
        self.serial += 1
        uid = str(os.geteuid()).encode().hex().encode()
        self.greeting = (b"\0AUTH EXTERNAL " + uid + b"\r\nBEGIN\r\n"
                         + method_call(self.serial, nmfacts.DBUS, "/org/freedesktop/DBus", nmfacts.DBUS, "Hello"))
        self.connect_timeout = timeout
        return self

    def _authenticated(self) -> None:
        """Read the bus's answer to AUTH (sent with the first calls)."""
        deadline = monotonic() + self.connect_timeout
        try:
            while b"\r\n" not in self.buf:
                self._fill(deadline)
        except _TIMEOUT:
            raise nmfacts.bus_silent(self.connect_timeout) from None
        except (OSError, EOFError) as exc:
            raise nmfacts.unreachable(exc) from None
        line, _, rest = bytes(self.buf).partition(b"\r\n")
        self.buf = bytearray(rest)
        if not line.startswith(b"OK "):
            raise nmfacts.unreachable(f"it refused to authenticate us: {line.decode(errors='replace')!r}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "WireBus":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fill(self, deadline: float) -> None:
        left = deadline - monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError("the bus closed the connection")
        self.buf += data

    def calls(self, calls: Sequence[Call], timeout: float = nmfacts.CALL_TIMEOUT) -> List[Any]:
        """Send ``calls`` together; per call its reply's body (a list), or the exception of its
        error reply (nmfacts.error_reply). NetworkManagerError if a reply does not come in time."""
        if self.sock is None:
            raise NetworkManagerError("the connection to the D-Bus system bus is closed")
        wanted, out, hello = {}, bytearray(self.greeting), None
        if self.greeting:  # the handshake goes first: Hello has the serial before the calls'
            hello, self.greeting = self.serial, b""
            wanted[hello] = (nmfacts.DBUS, "/org/freedesktop/DBus", "Hello")
        for destination, path, interface, member, signature, body in calls:
            self.serial += 1
            wanted[self.serial] = (destination, path, member)
            out += method_call(self.serial, destination, path, interface, member, signature, body)
        first = next(iter(wanted.values()), None)
        try:
            self.sock.sendall(out)
        except OSError as exc:
            raise NetworkManagerError(f"the D-Bus system bus connection broke during {first[2]} on {first[1]} "
                                      f"({exc})") from None
        if hello is not None:
            self._authenticated()
        replies = self._wait(dict(wanted), monotonic() + timeout, timeout)
        if isinstance(replies.get(hello), Exception):
            raise nmfacts.unreachable(f"it refused Hello: {replies[hello]}")
        return [replies[serial] for serial in wanted if serial != hello]

    def _wait(self, wanted: Dict[int, Tuple[str, str, str]], deadline: float, timeout: float) -> Dict[int, Any]:
        """The replies to the serials in ``wanted`` (others, and signals, are dropped)."""
        replies: Dict[int, Any] = {}
        while wanted:
            serial = next(iter(wanted))
            destination, path, member = wanted[serial]
            try:
                message = self._next(deadline)
            except _TIMEOUT:
                raise nmfacts.no_answer(destination, member, path, timeout) from None
            except (OSError, EOFError) as exc:
                raise NetworkManagerError(f"the D-Bus system bus went away during {member} on {path} "
                                          f"({exc})") from None
            except Malformed as exc:
                self.close()  # the stream cannot be trusted past it
                raise NetworkManagerError(f"a malformed message from the D-Bus system bus while waiting for "
                                          f"{member} on {path}: {exc}") from None
            answered = message.fields.get(REPLY_SERIAL)
            if message.type not in (METHOD_RETURN, ERROR) or answered not in wanted:
                continue
            destination, path, member = wanted.pop(answered)
            if message.type == ERROR:
                name = message.fields.get(ERROR_NAME, "")
                text = message.body[0] if message.body and isinstance(message.body[0], str) else name
                replies[answered] = nmfacts.error_reply(member, path, name, text)
            else:
                replies[answered] = message.body
        return replies

    def _next(self, deadline: float) -> Message:
        while True:
            total = message_length(self.buf)
            if total is not None and len(self.buf) >= total:
                data = bytes(self.buf[:total])
                del self.buf[:total]
                return parse(data)
            self._fill(deadline)

    def drive(self, steps: nmfacts.Steps, timeout: float = nmfacts.CALL_TIMEOUT) -> Any:
        """Answer the requests of nmfacts' steps, each step's requests sent together."""
        answers: Optional[List[Any]] = None
        while True:
            try:
                requests = steps.send(answers)
            except StopIteration as done:
                return done.value
            calls = [(nmfacts.NM, *nmfacts.call_of(request)) for request in requests]
            answers = [self._answer(call, reply) for call, reply in zip(calls, self.calls(calls, timeout))]

    @staticmethod
    def _answer(call: Call, reply: Any) -> Any:
        if isinstance(reply, NetworkManagerError):
            return reply
        if isinstance(reply, Exception):
            raise reply  # NotPermittedError: not a fact about the connection
        if not reply or not isinstance(reply[0], dict):
            raise NetworkManagerError(f"NetworkManager answered {call[3]} on {call[1]} with {reply!r}, not a dict")
        return reply[0]


def drive(steps: nmfacts.Steps, timeout: float = nmfacts.CALL_TIMEOUT) -> Any:
    """Connect to the system bus, answer ``steps``, close: the hook's one use of the bus."""
    with WireBus().connect() as bus:
        return bus.drive(steps, timeout)
