"""Netlink's wire format: messages and their attributes, for rtnl.py (routes, rules, addresses),
nfnetlink.py (conntrack, nftables' generation and notifications) and nftraw.py (nftables
changes)."""

from __future__ import annotations

import struct
from typing import Dict, Iterator

#: nlmsghdr: length, type, flags, sequence number, sender's port id
HDR = struct.Struct("=IHHII")


def nl_attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nl_attrs(data: bytes, offset: int) -> Dict[int, bytes]:
    """Kind (without the nested/byte-order flags) -> payload of the attributes from ``offset``."""
    out: Dict[int, bytes] = {}
    end = len(data)
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def nl_messages(data: bytes, with_portid: bool = False) -> Iterator[tuple]:
    """(type, flags, seq, body[, sender's portid]) of each message in a datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type, flags, seq, portid = HDR.unpack_from(data, offset)
        if length < 16:
            break
        body = data[offset + 16:offset + length]
        yield (msg_type, flags, seq, body, portid) if with_portid else (msg_type, flags, seq, body)
        offset += (length + 3) & ~3
