"""The daemon's rtnetlink watch (stdlib only): links, addresses, routes and rules as they change.

Each notification becomes a :class:`WatchEvent` saying whether to re-sync and which of the
daemon's remembered views (adapters/resident.py) no longer hold. Notifications of the
engine's own changes (its socket's port id) are skipped: the engine verifies those.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Callable, List, NamedTuple, Optional

from ..model import RT_PROTO
from .nlwire import nl_attrs, nl_messages
from .rtnl import (_RTMSG, FAMILY_OF, FRA_PROTOCOL, IFA_ADDRESS, IFA_F_DADFAILED, IFA_F_TENTATIVE, IFA_FLAGS,
                   IFA_LOCAL, NETLINK_ROUTE, RTM_DELADDR, RTM_DELLINK, RTM_DELROUTE, RTM_DELRULE, RTM_NEWADDR,
                   RTM_NEWLINK, RTM_NEWROUTE, RTM_NEWRULE, _ifname)


class RtnlWatch:
    """Link, address, route and rule notifications, as the daemon follows them (no pyroute2).

    :meth:`events` yields :class:`WatchEvent`: whether to re-sync (a link came up, one of our
    rules or routes was deleted by someone else, notifications were lost) and which
    remembered views no longer hold (routes vanish without a notification when their
    link goes down or their address goes away; rules and routes others change)."""

    #: RTMGRP_LINK, _IPV4_IFADDR, _IPV4_ROUTE, _IPV4_RULE, _IPV6_IFADDR, _IPV6_ROUTE, _IPV6_RULE
    GROUPS = 0x1 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x40000

    def __init__(self, ignore_portid: Optional[Callable[[], Optional[int]]] = None) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, self.GROUPS))
        #: the socket whose own changes are not reported (the daemon's engine verifies them)
        self.ignore_portid = ignore_portid or (lambda: None)

    def close(self) -> None:
        self.sock.close()

    def events(self) -> List["WatchEvent"]:
        """What the next batch of notifications says."""
        try:
            data = self.sock.recv(1 << 20)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # we missed some: say "anything may have changed"
                return [WatchEvent("netlink notifications overflowed", True, True, True, True)]
            raise
        out = []
        ours = self.ignore_portid()
        for kind, _flags, _seq, body, portid in nl_messages(data, with_portid=True):
            if ours is not None and portid == ours:
                continue
            if kind in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= 16:
                _family, _type, index, flags = struct.unpack_from("=BxHiI", body)
                up = kind == RTM_NEWLINK and flags & 1  # IFF_UP
                out.append(WatchEvent(f"link {_ifname(index)} {'up' if up else 'changed'}", bool(up), True,
                                      False, True))
            elif kind == RTM_DELADDR:
                out.append(WatchEvent("an address was removed", False, True, False, False))
            elif kind == RTM_NEWADDR and len(body) >= 8:
                attrs = nl_attrs(body, 8)
                flags = struct.unpack("=I", attrs[IFA_FLAGS])[0] if IFA_FLAGS in attrs else body[2]
                raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
                if raw and body[0] in FAMILY_OF and not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                    address = socket.inet_ntop(body[0], raw)
                    out.append(WatchEvent(f"address {address} usable", False, False, False, False, address))
            elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and len(body) >= 12 and body[5] == RT_PROTO:
                out.append(WatchEvent(f"{'RTM_DELROUTE' if kind == RTM_DELROUTE else 'RTM_NEWROUTE'} of ours",
                                      kind == RTM_DELROUTE, True, False, False))
            elif kind in (RTM_NEWRULE, RTM_DELRULE) and len(body) >= 12:
                mine = nl_attrs(body, _RTMSG.size).get(FRA_PROTOCOL, b"\0")[:1] == bytes([RT_PROTO])
                out.append(WatchEvent("RTM_DELRULE of ours" if mine and kind == RTM_DELRULE else "a rule changed",
                                      mine and kind == RTM_DELRULE, False, True, False))
        return out


class WatchEvent(NamedTuple):
    text: str
    resync: bool
    routes: bool
    rules: bool
    link: bool
    #: an address that became usable (duplicate address detection done)
    usable: Optional[str] = None
