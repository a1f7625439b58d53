"""The D-Bus wire format, both ways, for the hook's synchronous client (syncbus.py).

Messages and bodies: basic types, object paths, signatures, arrays, dicts, structs and
variants; little- and big-endian input. Values come out plain, as networkmanager.py's
``_plain`` gives them: a variant as its value, a struct as a list, ``ay`` as bytes. Bytes
that are not what they claim raise Malformed. Imports only C modules of the standard
library: the hook pays for no more.
"""

from __future__ import annotations

from struct import Struct, pack, pack_into, unpack_from
from struct import error as _StructError
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
#: header fields
PATH, INTERFACE, MEMBER, ERROR_NAME, REPLY_SERIAL, DESTINATION, SENDER, SIGNATURE = range(1, 9)
MAX_MESSAGE = 1 << 27  # the specification's limit

_ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4,
          "s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1}
_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q", "d": "d", "h": "I"}
_STRUCTS = {e: {f: Struct(e + f) for f in "BhHiIqQd"} for e in "<>"}
_ENDIAN = {ord("l"): "<", ord("B"): ">"}
_FIELD_TYPES = {PATH: "o", INTERFACE: "s", MEMBER: "s", ERROR_NAME: "s", REPLY_SERIAL: "u",
                DESTINATION: "s", SENDER: "s", SIGNATURE: "g"}


class Malformed(ValueError):
    """Bytes that are not a D-Bus message (truncated, or not what the signature says)."""


class Variant(NamedTuple):
    """A value to marshal as a variant: its signature (one complete type) and the value."""

    signature: str
    value: Any


class Message(NamedTuple):
    type: int
    flags: int
    serial: int
    fields: Dict[int, Any]
    body: List[Any]


# ---- signatures ------------------------------------------------------------------------

_SPLIT: Dict[str, List[str]] = {}


def _end(sig: str, i: int, element: bool = False) -> int:
    """The end of the one complete type starting at ``sig[i]`` (``element``: an array's)."""
    c = sig[i]
    if c == "a":
        return _end(sig, i + 1, element=True)
    if c == "(" or (c == "{" and element):
        close, start, i, count = ")" if c == "(" else "}", i, i + 1, 0
        while sig[i] != close:
            if c == "{" and count == 0 and sig[i] in "av({":
                break  # a dict's key is a basic type
            i, count = _end(sig, i), count + 1
        else:
            if count and (c == "(" or count == 2):
                return i + 1
        raise Malformed(f"a bad {'struct' if c == '(' else 'dict entry'} at {start} in signature {sig!r}")
    if c in _ALIGN and c not in "({":
        return i + 1
    raise Malformed(f"not a D-Bus type: {c!r} in signature {sig!r}")


def split(sig: str) -> List[str]:
    """A signature -> its complete types: ``"sa{sv}i"`` -> ``["s", "a{sv}", "i"]``."""
    types = _SPLIT.get(sig)
    if types is None:
        types, i = [], 0
        try:
            while i < len(sig):
                end = _end(sig, i)
                types.append(sig[i:end])
                i = end
        except (IndexError, RecursionError):
            raise Malformed(f"incomplete D-Bus signature {sig!r}") from None
        _SPLIT[sig] = types
    return types


# ---- marshalling -----------------------------------------------------------------------


class _Writer:
    def __init__(self, endian: str, buf: Optional[bytearray] = None) -> None:
        self.e, self.buf = endian, buf if buf is not None else bytearray()

    def pad(self, n: int) -> None:
        self.buf += bytes(-len(self.buf) % n)

    def write(self, t: str, value: Any) -> None:
        c = t[0]
        if c in _FIXED:
            self.pad(_ALIGN[c])
            self.buf += pack(self.e + _FIXED[c], int(value) if c == "b" else value)
        elif c in "so":
            data = value.encode()
            self.pad(4)
            self.buf += pack(self.e + "I", len(data)) + data + b"\0"
        elif c == "g":
            data = value.encode()
            self.buf += bytes((len(data),)) + data + b"\0"
        elif c == "v":
            signature, inner = value
            if len(split(signature)) != 1:
                raise Malformed(f"a variant holds one complete type, not {signature!r}")
            self.write("g", signature)
            self.write(signature, inner)
        elif c == "a":
            self._array(t[1:], value)
        else:  # a struct or a dict entry
            self.pad(8)
            for sub, item in zip(split(t[1:-1]), value):
                self.write(sub, item)

    def _array(self, elem: str, value: Any) -> None:
        self.pad(4)
        at = len(self.buf)
        self.buf += bytes(4)
        self.pad(_ALIGN[elem[0]])
        start = len(self.buf)
        if elem == "y":
            self.buf += bytes(value)
        else:
            for item in (value.items() if elem[0] == "{" else value):
                self.write(elem, item)
        pack_into(self.e + "I", self.buf, at, len(self.buf) - start)


def marshal(signature: str, values: Sequence[Any], endian: str = "<") -> bytes:
    """A message body: ``values`` as ``signature`` says (variants as :class:`Variant`)."""
    types = split(signature)
    if len(types) != len(values):
        raise Malformed(f"signature {signature!r} has {len(types)} types for {len(values)} values")
    writer = _Writer(endian)
    for t, value in zip(types, values):
        writer.write(t, value)
    return bytes(writer.buf)


def message(kind: int, serial: int, fields: Dict[int, Any], signature: str = "", body: Sequence[Any] = (),
            endian: str = "<") -> bytes:
    """A whole message: header ``fields`` (code -> value, typed as the specification says) and body."""
    data = marshal(signature, body, endian)
    fields = dict(fields)
    if signature:
        fields[SIGNATURE] = signature
    header = [(code, Variant(_FIELD_TYPES[code], value)) for code, value in fields.items()]
    writer = _Writer(endian, bytearray(b"l" if endian == "<" else b"B") + pack(endian + "BBBII", kind, 0, 1,
                                                                                   len(data), serial))
    writer.write("a(yv)", header)
    writer.pad(8)
    return bytes(writer.buf) + data


def method_call(serial: int, destination: str, path: str, interface: str, member: str,
                signature: str = "", body: Sequence[Any] = (), endian: str = "<") -> bytes:
    return message(METHOD_CALL, serial, {PATH: path, INTERFACE: interface, MEMBER: member,
                                         DESTINATION: destination}, signature, body, endian)


# ---- unmarshalling ---------------------------------------------------------------------


class _Reader:
    """Reads from ``data`` (bytes) at ``pos``; alignment counts from the message's first byte (0).
    Written for speed: the hook parses every device's properties at every event."""

    def __init__(self, data: bytes, pos: int, endian: str) -> None:
        self.data, self.pos, self.e = data, pos, endian
        self.structs = _STRUCTS[endian]
        self.u32 = self.structs["I"].unpack_from

    def _truncated(self, at: int, n: int) -> Malformed:
        return Malformed(f"truncated: {at + n - len(self.data)} bytes missing at offset {at}")

    def align(self, n: int) -> None:
        pos = self.pos + (-self.pos % n)
        if pos > len(self.data):
            raise self._truncated(self.pos, pos - self.pos)
        self.pos = pos

    def _fixed(self, fmt: str) -> Any:
        unpacker = self.structs[fmt]
        size = unpacker.size
        pos = self.pos + (-self.pos % size)
        if pos + size > len(self.data):
            raise self._truncated(pos, size)
        self.pos = pos + size
        return unpacker.unpack_from(self.data, pos)[0]

    def _text(self, start: int, n: int) -> str:
        data, stop = self.data, start + n
        if stop >= len(data):
            raise self._truncated(start, n + 1)
        if data[stop] != 0:
            raise Malformed(f"a string at offset {start} does not end with NUL")
        self.pos = stop + 1
        return data[start:stop].decode()

    def read(self, t: str) -> Any:
        c = t[0]
        if c == "s" or c == "o":
            pos = self.pos + (-self.pos % 4)
            if pos + 4 > len(self.data):
                raise self._truncated(pos, 4)
            return self._text(pos + 4, self.u32(self.data, pos)[0])
        if c == "v":
            return self._variant()
        if c == "a":
            return self._array(t[1:])
        fmt = _FIXED.get(c)
        if fmt is not None:
            value = self._fixed(fmt)
            return bool(value) if c == "b" else value
        if c == "g":
            n = self._fixed("B")
            return self._text(self.pos, n)
        self.align(8)  # a struct (a list) or a dict entry
        return [self.read(sub) for sub in split(t[1:-1])]

    def _variant(self) -> Any:
        data, pos = self.data, self.pos
        if pos + 3 <= len(data) and data[pos] == 1 and data[pos + 2] == 0:  # one type (most values)
            c = chr(data[pos + 1])
            self.pos = pos + 3
            if c == "s" or c == "o":
                start = pos + 3 + (-(pos + 3) % 4)
                if start + 4 > len(data):
                    raise self._truncated(start, 4)
                return self._text(start + 4, self.u32(data, start)[0])
            fmt = _FIXED.get(c)
            if fmt is not None:
                value = self._fixed(fmt)
                return bool(value) if c == "b" else value
            if c == "g":
                return self.read(c)
            self.pos = pos  # (a container of one letter: not a complete type)
        n = self._fixed("B")
        signature = self._text(self.pos, n)
        types = split(signature)
        if len(types) != 1:
            raise Malformed(f"a variant with signature {signature!r}")
        return self.read(types[0])

    def _array(self, elem: str) -> Any:
        length = self._fixed("I")
        self.align(_ALIGN[elem[0]])
        end = self.pos + length
        if end > len(self.data):
            raise Malformed(f"truncated: an array of {length} bytes at offset {self.pos}")
        if elem == "y":
            self.pos = end
            return self.data[end - length:end]
        read = self.read
        if elem == "{sv}":  # properties: most of what NetworkManager sends
            out: Any = {}
            data, u32 = self.data, self.u32
            while self.pos < end:
                pos = self.pos + (-self.pos % 8)
                if pos + 4 > len(data):
                    raise self._truncated(pos, 4)
                key = self._text(pos + 4, u32(data, pos)[0])
                out[key] = self._variant()
        elif elem[0] == "{":
            key, value = split(elem[1:-1])
            out = {}
            while self.pos < end:
                self.align(8)
                k = read(key)
                out[k] = read(value)
        else:
            out = []
            while self.pos < end:
                out.append(read(elem))
        if self.pos != end:
            raise Malformed(f"an array's elements overrun its length at offset {end}")
        return out


def _body(reader: _Reader, signature: str) -> List[Any]:
    try:
        return [reader.read(t) for t in split(signature)]
    except (_StructError, IndexError, UnicodeDecodeError, RecursionError) as exc:
        raise Malformed(str(exc)) from None


def unmarshal(signature: str, data: bytes, endian: str = "<") -> List[Any]:
    """A message body (8-aligned in its message, as every body is) -> plain values."""
    reader = _Reader(bytes(data), 0, endian)
    values = _body(reader, signature)
    if reader.pos != len(data):
        raise Malformed(f"{len(data) - reader.pos} bytes left after signature {signature!r}")
    return values


def message_length(data: bytes) -> Optional[int]:
    """The length of the message ``data`` starts with, once its first 16 bytes are there."""
    if len(data) < 16:
        return None
    endian = _ENDIAN.get(data[0])
    if endian is None or data[3] != 1:
        raise Malformed(f"not a D-Bus message (endianness {data[0]!r}, version {data[3]})")
    body, fields = unpack_from(endian + "I", data, 4)[0], unpack_from(endian + "I", data, 12)[0]
    total = 16 + fields + (-fields % 8) + body
    if total > MAX_MESSAGE:
        raise Malformed(f"a message of {total} bytes")
    return total


def parse(data: bytes) -> Message:
    """One whole message -> its type, flags, serial, header fields and body (plain values)."""
    total = message_length(data)
    if total is None or total > len(data):
        raise Malformed(f"truncated: a message of {len(data)} bytes, its header says {total or 16}")
    data, endian = bytes(data), _ENDIAN[data[0]]
    kind, flags = data[1], data[2]
    body_length, serial = unpack_from(endian + "II", data, 4)
    reader = _Reader(data, 12, endian)
    fields = {code: value for code, value in _body(reader, "a(yv)")[0]}
    for code, t in _FIELD_TYPES.items():
        if code in fields and not _typed(fields[code], t):
            raise Malformed(f"header field {code} is not of type {t!r}")
    reader.align(8)
    body_start = reader.pos
    reader.data = data[:body_start + body_length]
    body = _body(reader, fields.get(SIGNATURE, ""))
    if reader.pos != body_start + body_length:
        raise Malformed(f"{body_start + body_length - reader.pos} bytes left after the body")
    return Message(kind, flags, serial, fields, body)


def _typed(value: Any, t: str) -> bool:
    return isinstance(value, int) if t == "u" else isinstance(value, str)
