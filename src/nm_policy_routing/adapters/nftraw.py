"""One connection's change to our nft table as one nfnetlink batch, spoken directly.

libnftables reads the whole table into its cache before a transaction that adds a rule or a
map element jumping to a chain (every chain of ours: three per mark), which makes one
connection's change cost O(N). The element-by-element changes nftdelta.py makes use a
handful of shapes (map elements with a jump, per-mark chains and their rules, the base
chains' few rules written anew when a direction comes or goes); this module
encodes exactly those as the netlink messages nft itself sends (checked against ``nft
--debug=netlink``), in one batch (all or nothing, as one ``json_cmd``). Any other shape
raises :class:`Unsupported` before anything is sent: the caller then uses libnftables.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any, Dict, List, Optional, Tuple

from ..errors import KernelError, NotPermittedError
from ..model import NFT_TABLE
from .nfnetlink import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NLMSG_ERROR
from .nlwire import nl_attr, nl_messages

NFPROTO_INET = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, NEWSETELEM, DELSETELEM = 3, 5, 6, 8, 12, 14
NLA_F_NESTED = 0x8000
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NF_ACCEPT, NFT_JUMP, NFT_RETURN = 1, -3, -5
NFT_META_MARK = NFT_CT_MARK = 3
NFT_FIB_RESULT_ADDRTYPE, NFTA_FIB_F_DADDR = 3, 2
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
RTN_LOCAL = 2
IFNAMSIZ = 16
U32 = 0xFFFFFFFF


class Unsupported(Exception):
    """A command this module does not encode (the caller uses libnftables)."""


def _nest(kind: int, *parts: bytes) -> bytes:
    return nl_attr(kind | NLA_F_NESTED, b"".join(parts))


def _str(kind: int, text: str) -> bytes:
    return nl_attr(kind, text.encode() + b"\0")


def _be32(kind: int, value: int) -> bytes:
    return nl_attr(kind, struct.pack(">I", value & U32))


def _value(kind: int, raw: bytes) -> bytes:
    return _nest(kind, nl_attr(1, raw))  # NFTA_DATA_VALUE


def _verdict(kind: int, code: int, chain: Optional[str] = None) -> bytes:
    inner = nl_attr(1, struct.pack(">i", code)) + (_str(2, chain) if chain else b"")  # NFTA_VERDICT_CODE, _CHAIN
    return _nest(kind, _nest(2, inner))  # NFTA_DATA_VERDICT


def _expr(name: str, *data: bytes) -> bytes:
    return _nest(1, _str(1, name), _nest(2, *data))  # NFTA_LIST_ELEM: NFTA_EXPR_NAME, NFTA_EXPR_DATA


def _u32(value: int) -> bytes:
    return struct.pack("=I", value & U32)  # the mark and fib types are in host order


# ---- the expressions nftjson.build writes in per-mark chains -----------------------------


def _mangle(stmt: Dict[str, Any]) -> List[bytes]:
    """``KEY mark set KEY mark & ~M | V`` or ``KEY mark set V`` (KEY: meta or ct)."""
    key = next(iter(stmt["key"]))
    if key not in ("meta", "ct") or stmt["key"][key] != {"key": "mark"}:
        raise Unsupported(f"mangle of {stmt['key']}")
    sreg = 3 if key == "meta" else 4  # NFTA_META_SREG / NFTA_CT_SREG (KEY is 2 and DREG 1 in both)
    value = stmt["value"]
    if isinstance(value, int):
        out = [_expr("immediate", _be32(1, NFT_REG_1), _value(2, _u32(value)))]
    else:
        try:
            (inner, xor), = [value["|"]]
            (source, keep), = [inner["&"]]
        except (KeyError, TypeError, ValueError):
            raise Unsupported(f"mark value {value}") from None
        if source != {key: {"key": "mark"}} or not isinstance(keep, int) or not isinstance(xor, int):
            raise Unsupported(f"mark value {value}")
        out = [_expr(key, _be32(2, NFT_META_MARK), _be32(1, NFT_REG_1)),
               _expr("bitwise", _be32(1, NFT_REG_1), _be32(2, NFT_REG_1), _be32(3, 4),
                     _value(4, _u32(keep)), _value(5, _u32(xor)))]
    return out + [_expr(key, _be32(2, NFT_META_MARK), _be32(sreg, NFT_REG_1))]


# ---- the base chains' rules (nftjson.build: a look-up of a mark or an interface name) ---------

NFT_META_IIFNAME, NFT_META_OIFNAME = 6, 7
_LOADS = {("meta", "mark"): NFT_META_MARK, ("ct", "mark"): NFT_CT_MARK,
          ("meta", "iifname"): NFT_META_IIFNAME, ("meta", "oifname"): NFT_META_OIFNAME}


_MARKS = ({"meta": {"key": "mark"}}, {"ct": {"key": "mark"}})


def _load(value: Any) -> List[bytes]:
    """``KEY`` (meta mark, ct mark, iifname, oifname) or ``KEY & M`` into register 1."""
    if isinstance(value, dict) and set(value) == {"&"} and len(value["&"]) == 2:
        source, mask = value["&"]
        if source not in _MARKS or not isinstance(mask, int):
            raise Unsupported(f"expression {value}")
        return _load(source) + [_expr("bitwise", _be32(1, NFT_REG_1), _be32(2, NFT_REG_1), _be32(3, 4),
                                      _value(4, _u32(mask)), _value(5, _u32(0)))]
    if isinstance(value, dict) and len(value) == 1:
        (key, spec), = value.items()
        code = _LOADS.get((key, spec.get("key") if isinstance(spec, dict) and len(spec) == 1 else None))
        if code is not None:
            return [_expr(key, _be32(2, code), _be32(1, NFT_REG_1))]  # NFTA_{META,CT}_KEY, _DREG
    raise Unsupported(f"expression {value}")


def _match(stmt: Dict[str, Any]) -> List[bytes]:
    """``KEY [& M] == V`` of a mark."""
    left, right = stmt.get("left"), stmt.get("right")
    source = left["&"][0] if isinstance(left, dict) and set(left) == {"&"} and len(left["&"]) == 2 else left
    if stmt.get("op") != "==" or not isinstance(right, int) or source not in _MARKS:
        raise Unsupported(f"match {stmt}")
    return _load(left) + [_expr("cmp", _be32(1, NFT_REG_1), _be32(2, NFT_CMP_EQ), _value(3, _u32(right)))]


def _vmap(stmt: Dict[str, Any]) -> List[bytes]:
    """``KEY [& M] vmap @MAP``: a look-up in one of our maps, its verdict taken."""
    data = stmt.get("data")
    if set(stmt) != {"key", "data"} or not isinstance(data, str) or not data.startswith("@"):
        raise Unsupported(f"vmap {stmt}")
    # NFTA_LOOKUP_SET, _SREG, _DREG (the verdict register)
    return _load(stmt["key"]) + [_expr("lookup", _str(1, data[1:]), _be32(2, NFT_REG_1),
                                       _be32(3, NFT_REG_VERDICT))]


_NOT_LOCAL = {"match": {"op": "!=", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}


def _statement(stmt: Dict[str, Any]) -> List[bytes]:
    if "mangle" in stmt:
        return _mangle(stmt["mangle"])
    if set(stmt) == {"vmap"}:
        return _vmap(stmt["vmap"])
    if set(stmt) == {"match"} and stmt != _NOT_LOCAL:
        return _match(stmt["match"])
    if stmt == _NOT_LOCAL:
        return [_expr("fib", _be32(1, NFT_REG_1), _be32(2, NFT_FIB_RESULT_ADDRTYPE), _be32(3, NFTA_FIB_F_DADDR)),
                _expr("cmp", _be32(1, NFT_REG_1), _be32(2, NFT_CMP_NEQ), _value(3, _u32(RTN_LOCAL)))]
    for name, code in (("return", NFT_RETURN), ("accept", NF_ACCEPT)):
        if stmt == {name: None}:
            return [_expr("immediate", _be32(1, NFT_REG_VERDICT), _verdict(2, code))]
    raise Unsupported(f"statement {stmt}")


def _key(map_name: str, key: Any) -> bytes:
    if map_name.startswith("restore_") and isinstance(key, int):
        return _u32(key)
    if map_name in ("incoming", "outgoing") and isinstance(key, str) and len(key.encode()) < IFNAMSIZ:
        return key.encode().ljust(IFNAMSIZ, b"\0")
    raise Unsupported(f"key {key!r} of map {map_name}")


def _element(verb: str, obj: Dict[str, Any]) -> Tuple[int, int, bytes]:
    name = obj["name"]
    items = []
    for elem in obj["elem"]:
        if verb == "add":
            key, data = elem
            if set(data) != {"jump"}:
                raise Unsupported(f"element data {data}")
            items.append(_nest(1, _value(1, _key(name, key)), _verdict(2, NFT_JUMP, data["jump"]["target"])))
        else:
            items.append(_nest(1, _value(1, _key(name, elem))))
    body = _str(1, NFT_TABLE) + _str(2, name) + _nest(3, *items)
    return (NEWSETELEM, NLM_F_CREATE, body) if verb == "add" else (DELSETELEM, 0, body)


def message(cmd: Dict[str, Any]) -> Tuple[int, int, bytes]:
    """(message type, flags, attributes) of one command of an nftdelta transaction."""
    (verb, spec), = cmd.items()
    (kind, obj), = spec.items()
    if obj.get("family", "inet") != "inet" or obj.get("table", NFT_TABLE) != NFT_TABLE:
        raise Unsupported(f"{verb} {kind} outside our table")
    if kind == "element" and verb in ("add", "delete"):
        return _element(verb, obj)
    if kind == "chain" and set(obj) <= {"family", "table", "name"}:
        body = _str(1, NFT_TABLE) + _str(3, obj["name"])  # NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME
        types = {"add": (NEWCHAIN, NLM_F_CREATE), "delete": (DELCHAIN, 0),
                 "flush": (DELRULE, 0)}  # a rule deletion naming only the chain: all its rules
        if verb in types:
            return (*types[verb], body if verb != "flush" else _str(1, NFT_TABLE) + _str(2, obj["name"]))
    if kind == "rule" and verb == "add" and set(obj) <= {"family", "table", "chain", "expr"}:
        exprs = [raw for stmt in obj["expr"] for raw in _statement(stmt)]
        body = _str(1, NFT_TABLE) + _str(2, obj["chain"]) + _nest(4, *exprs)  # NFTA_RULE_EXPRESSIONS
        return NEWRULE, NLM_F_CREATE | NLM_F_APPEND, body
    raise Unsupported(f"{verb} {kind}")


class NftBatch:
    """A netfilter netlink socket committing nftdelta transactions (kept open: closing one waits
    for an RCU grace period)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.settimeout(5)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def _header(self, msg_type: int, flags: int, family: int, res_id: int, body: bytes) -> Tuple[int, bytes]:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        payload = struct.pack("=BBH", family, 0, socket.htons(res_id)) + body
        return self._seq, struct.pack("=IHHII", 16 + len(payload), msg_type, flags, self._seq, 0) + payload

    def commit(self, transaction: Dict[str, Any]) -> None:
        """Every command of ``transaction`` (``{"nftables": [...]}`` from nftdelta) or none."""
        messages = [message(cmd) for cmd in transaction["nftables"]]  # Unsupported: before sending
        if not messages:
            return
        _, begin = self._header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, b"")
        seqs, parts = [], [begin]
        for msg_type, flags, body in messages:
            seq, raw = self._header((NFNL_SUBSYS_NFTABLES << 8) | msg_type, NLM_F_REQUEST | NLM_F_ACK | flags,
                                    NFPROTO_INET, 0, body)
            seqs.append(seq)
            parts.append(raw)
        parts.append(self._header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, b"")[1])
        self.sock.send(b"".join(parts))
        self._acks(seqs, transaction["nftables"])

    def _acks(self, seqs: List[int], cmds: list) -> None:
        waiting = dict(zip(seqs, cmds))
        failed: List[Tuple[int, Any]] = []
        while waiting:
            for kind, _flags, seq, body in nl_messages(self.sock.recv(1 << 16)):
                if kind == NLMSG_ERROR and seq in waiting:
                    code = -struct.unpack_from("=i", body)[0]
                    cmd = waiting.pop(seq)
                    if code:
                        failed.append((code, cmd))
        if failed:
            code, cmd = failed[0]
            if code == errno.EPERM:
                raise NotPermittedError("cannot change our nft table: not permitted (needs root or CAP_NET_ADMIN)")
            raise KernelError(f"nftables refused to change our table's marking entries ({os.strerror(code)}: "
                              f"{next(iter(cmd))} {next(iter(next(iter(cmd.values()))))}); nothing was changed")
