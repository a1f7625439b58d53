"""A stand-in for dbus-daemon and NetworkManager on a unix socket, for the wire client's tests.

It accepts one client, checks nothing of its AUTH but records it, answers ``OK``, answers
Hello, and then each method call with what ``respond(message)`` returns: bytes to send
(a reply, several, garbage), None to stay silent, CLOSE to hang up, or a list of these. Replies are built with
the client's own marshaller in either byte order; the tests also check that marshaller
against dbus-next's.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from nm_policy_routing.adapters import dbuswire as wire
from nm_policy_routing.adapters.nmfacts import SETTINGS_CONN

CLOSE = object()
Respond = Callable[[wire.Message], Union[bytes, None, object]]


def reply(call: wire.Message, signature: str = "", body: Sequence[Any] = (), endian: str = "<") -> bytes:
    return wire.message(wire.METHOD_RETURN, 1000 + call.serial, {wire.REPLY_SERIAL: call.serial}, signature, body,
                        endian)


def error(call: wire.Message, name: str, text: str, endian: str = "<") -> bytes:
    return wire.message(wire.ERROR, 1000 + call.serial, {wire.REPLY_SERIAL: call.serial, wire.ERROR_NAME: name},
                        "s", [text], endian)


def signal(endian: str = "<") -> bytes:
    return wire.message(wire.SIGNAL, 999, {wire.PATH: "/org/freedesktop/DBus", wire.INTERFACE: "org.freedesktop.DBus",
                                           wire.MEMBER: "NameAcquired"}, "s", [":1.1"], endian)


class FakeBus:
    def __init__(self, directory: str, respond: Respond, auth_answer: Optional[bytes] = b"OK 0123abcd\r\n") -> None:
        self.path = os.path.join(directory, "bus")
        self.address = f"unix:path={self.path}"
        self.respond, self.auth_answer = respond, auth_answer
        self.auth = b""
        self.calls: List[wire.Message] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            buf = b""
            while b"BEGIN\r\n" not in buf:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
            self.auth, _, buf = buf.partition(b"BEGIN\r\n")
            if self.auth_answer is None:  # a bus that never answers
                conn.recv(4096)
                return
            conn.sendall(self.auth_answer)
            while True:
                total = wire.message_length(buf)
                if total is None or len(buf) < total:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                    continue
                call, buf = wire.parse(buf[:total]), buf[total:]
                out = (signal() + reply(call, "s", [":1.1"]) if call.fields.get(wire.MEMBER) == "Hello"
                       else self._answer(call))
                for part in out if isinstance(out, list) else [out]:
                    if part is CLOSE:
                        return
                    if part:
                        conn.sendall(part)

    def _answer(self, call: wire.Message) -> Any:
        self.calls.append(call)
        return self.respond(call)

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)


# ---- NetworkManager's objects, served from a dict --------------------------------------

Objects = Dict[Tuple[str, str], Dict[str, Any]]


def variant(value: Any) -> wire.Variant:
    """A plain value as NetworkManager would type it (enough for the tests' objects)."""
    if isinstance(value, bool):
        return wire.Variant("b", value)
    if isinstance(value, int):
        return wire.Variant("u", value)
    if isinstance(value, str):
        return wire.Variant("o" if value.startswith("/") else "s", value)
    if isinstance(value, dict):
        return wire.Variant("a{sv}", {k: variant(v) for k, v in value.items()})
    if all(isinstance(v, dict) for v in value):
        return wire.Variant("aa{sv}", [{k: variant(v) for k, v in d.items()} for d in value])
    if value and all(isinstance(v, str) and v.startswith("/") for v in value):
        return wire.Variant("ao", list(value))
    return wire.Variant("as", list(value))


def serve_objects(objects: Objects, endian: str = "<") -> Respond:
    """GetAll and GetSettings answered from ``objects`` ((path, interface) -> properties);
    an unknown object gets NetworkManager's UnknownMethod error."""

    def respond(call: wire.Message) -> bytes:
        path, member = call.fields[wire.PATH], call.fields[wire.MEMBER]
        key = (path, SETTINGS_CONN if member == "GetSettings" else call.body[0])
        if key not in objects:
            return error(call, "org.freedesktop.DBus.Error.UnknownMethod", f"no {key[1]} at {path}", endian)
        if member == "GetSettings":
            settings = {name: {k: variant(v) for k, v in group.items()} for name, group in objects[key].items()}
            return reply(call, "a{sa{sv}}", [settings], endian)
        return reply(call, "a{sv}", [{k: variant(v) for k, v in objects[key].items()}], endian)

    return respond
