"""Small nfnetlink conversations, spoken directly on a netlink socket (stdlib only).

- :func:`flush_conntrack_mark`: delete the conntrack entries whose mark matches
  VALUE/MASK, in every family, and nothing else (IPCTNL_MSG_CT_DELETE with a mark
  filter: the kernel's own filtered flush). pyroute2's conntrack API differs between
  0.7 and 0.9 and dumps one family only, so it is not used for this.
- :func:`nft_generation`: the nftables ruleset's generation (NFT_MSG_GETGEN): every
  committed transaction in the namespace adds one.
- :class:`NftWatch`: nftables change notifications (group NFNLGRP_NFTABLES), to notice
  at once when something else deletes or changes our table (``nft flush ruleset``).
"""

from __future__ import annotations

import errno
import os
import _socket as socket  # the C module: socket.py's enums cost the hook ~4 ms at every event
import struct
from typing import Callable, Iterator, List, Optional, Tuple

from ..errors import KernelError, NotPermittedError
from ..model import NFT_TABLE
from .nlwire import nl_attr, nl_attrs, nl_messages

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_NFTABLES = 1, 10
IPCTNL_MSG_CT_DELETE = 2
CTA_MARK, CTA_MARK_MASK = 8, 21
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFNLGRP_NFTABLES = 7
NFT_MSG_NEWGEN, NFT_MSG_GETGEN, NFTA_GEN_ID, NFTA_GEN_PROC_PID = 15, 16, 1, 2
#: nftables messages whose first attribute (type 1) is the table name
NFT_MSG_NAMES = {0: "newtable", 2: "deltable", 3: "newchain", 5: "delchain", 6: "newrule", 8: "delrule",
                 9: "newset", 11: "delset", 12: "newsetelem", 14: "delsetelem"}


def _message(msg_type: int, flags: int, body: bytes, seq: int = 1) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def conntrack_socket() -> socket.socket:
    """A socket for :func:`flush_conntrack_mark`. Keep it: closing a netlink socket waits for an
    RCU grace period (~10 ms here), more than the flush itself."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.settimeout(5)
    sock.bind((0, 0))
    return sock


def flush_conntrack_mark(value: int, mask: int, sock: Optional[socket.socket] = None) -> None:
    """Delete every conntrack entry with (ct mark & mask) == value; ENOENT (none) is fine."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    body += nl_attr(CTA_MARK, struct.pack(">I", value)) + nl_attr(CTA_MARK_MASK, struct.pack(">I", mask))
    msg = _message((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, body)
    own = sock is None
    sock = conntrack_socket() if sock is None else sock
    try:
        sock.send(msg)
        reply = sock.recv(65536)
    finally:
        if own:
            sock.close()
    code = _ack(reply)
    if code in (0, errno.ENOENT):
        return
    if code == errno.EPERM:
        raise NotPermittedError("cannot flush conntrack entries: not permitted (needs CAP_NET_ADMIN)")
    raise KernelError(f"conntrack refused to flush mark 0x{value:x}/0x{mask:x}: {os.strerror(code)}")


def nft_generation(sock: socket.socket) -> int:
    """The ruleset's generation id, asked on ``sock`` (a :func:`conntrack_socket`)."""
    sock.send(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST,
                       struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)))
    for msg_type, _flags, _seq, payload in nl_messages(sock.recv(65536)):
        if msg_type == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            generation = _u32_attr(payload, NFTA_GEN_ID)
            if generation is not None:
                return generation
        if msg_type == NLMSG_ERROR:
            code = -struct.unpack("=i", payload[:4])[0]
            raise KernelError(f"nftables did not tell its ruleset generation: {os.strerror(code)}")
    raise KernelError("nftables did not tell its ruleset generation")


def _ack(reply: bytes) -> int:
    for msg_type, _flags, _seq, payload in nl_messages(reply):
        if msg_type == NLMSG_ERROR:
            return -struct.unpack("=i", payload[:4])[0]
    return 0


def _first_string_attr(payload: bytes) -> str:
    """Attribute 1 after the 4-byte nfgenmsg: the table name in nftables messages."""
    return nl_attrs(payload, 4).get(1, b"").split(b"\0", 1)[0].decode(errors="replace")


def _gen_pid(payload: bytes) -> Optional[int]:
    """NFTA_GEN_PROC_PID of a NEWGEN message: the thread that committed the batch."""
    return _u32_attr(payload, NFTA_GEN_PROC_PID)


def _u32_attr(payload: bytes, wanted: int) -> Optional[int]:
    """A big-endian 32-bit attribute after the 4-byte nfgenmsg."""
    raw = nl_attrs(payload, 4).get(wanted, b"")
    return struct.unpack_from(">I", raw)[0] if len(raw) >= 4 else None


class NftWatch:
    """A socket subscribed to nftables notifications; :meth:`events` blocks for the next batch.

    ``ignore_pid()`` names a thread whose own committed batches are not reported (the
    daemon's engine thread: it verifies its own changes); each batch ends with a NEWGEN
    message that names the committing thread."""

    def __init__(self, ignore_pid: Optional[Callable[[], Optional[int]]] = None) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        self.ignore_pid = ignore_pid or (lambda: None)
        self._pending: List[Tuple[str, str]] = []

    def events(self) -> List[Tuple[str, str]]:
        """(message name, table) of the next complete batches of nftables changes."""
        try:
            data = self.sock.recv(1 << 20)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # we missed some: say "something changed"
                self._pending = []
                return [("overrun", NFT_TABLE)]
            raise
        out = []
        for msg_type, _flags, _seq, payload in nl_messages(data):
            if msg_type >> 8 != NFNL_SUBSYS_NFTABLES:
                continue
            if msg_type & 0xFF == NFT_MSG_NEWGEN:
                pid = _gen_pid(payload)
                if pid is None or pid != self.ignore_pid():
                    out.extend(self._pending)
                self._pending = []
            elif (msg_type & 0xFF) in NFT_MSG_NAMES:
                self._pending.append((NFT_MSG_NAMES[msg_type & 0xFF], _first_string_attr(payload)))
        return out

    def close(self) -> None:
        self.sock.close()
