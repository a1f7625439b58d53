"""Our rules and routes over a plain rtnetlink socket (stdlib only): read, add, delete.

The engine's hot path, without pyroute2: importing pyroute2 costs ~80-400 ms and ~20 MB,
and it spends ~0.85 ms building each message and runs an asyncio loop per request;
here a message is a few ``struct.pack`` calls and a request one ``send`` + one ``recv``.
Many requests go out in one ``send``, and the kernel answers only the failures and the
last request (:meth:`Rtnl.batch`): ``add_rules`` & co. report each entry's error. Dumps of routes are filtered by the kernel (strict checking:
protocol, table); rule dumps cannot be filtered and are decoded cheaply.

Same contract as :class:`.netlink.Netlink` for the reconcile loop (which tags what is
ours with RT_PROTO and learns which tables and priorities foreign owners use);
``explain`` keeps using pyroute2 (netlink.py) for its full FIB views.
"""

from __future__ import annotations

import errno
import os
import _socket as socket  # the C module: socket.py's enums cost the hook ~4 ms at every event
import struct
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from ..errors import KernelError, NotPermittedError
from ..model import RT_PROTO, ForeignUsage, Fwmark, Route, Rule
from ..owners import rule_owner
from .nlwire import HDR, nl_attr, nl_attrs, nl_messages

NETLINK_ROUTE, SOL_NETLINK, NETLINK_GET_STRICT_CHK = 0, 270, 12
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NETLINK_CAP_ACK, NETLINK_EXT_ACK, NLM_F_CAPPED, NLM_F_ACK_TLVS, NLMSGERR_ATTR_MSG = 10, 11, 0x100, 0x200, 1
#: requests sent at once: the answers to a window's failures must fit the socket's receive buffer
WINDOW = 128
#: foreign routes are looked up table by table this many times in one reconcile, then all at once
TABLES_ASKED_ONE_BY_ONE = 8
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 16, 17, 20, 21, 22
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15
FRA_SRC, FRA_IIFNAME, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 2, 3, 6, 10, 15, 16, 21
FRA_UID_RANGE, FIB_RULE_FIND_SADDR = 20, 0x00010000
FR_ACT_TO_TBL, RTN_UNICAST, RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_TABLE_COMPAT = 1, 1, 0, 253, 252
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
FAMILY_OF = {socket.AF_INET: 4, socket.AF_INET6: 6}
_DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}
_RESERVED_TABLES = {0, 253, 254, 255}
U32 = 0xFFFFFFFF
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg and fib_rule_hdr have the same layout


def _u32(kind: int, value: int) -> bytes:
    return nl_attr(kind, struct.pack("=I", value))


def _ifindex(name: str) -> Optional[int]:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _ifname(index: Optional[int]) -> str:
    if index is None:
        return ""
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


def rule_message(rule: Rule) -> bytes:
    """The body of RTM_NEWRULE/RTM_DELRULE for one of our rules."""
    table = rule.table
    # an IPv6 source rule with a uid range must match a lookup that has no source yet (apps.py)
    flags = FIB_RULE_FIND_SADDR if rule.uid_start >= 0 and rule.family == 6 and rule.src else 0
    body = _RTMSG.pack(AF[rule.family], 0, rule.src_len if rule.src else 0, 0, table if table < 256 else 0,
                       0, 0, FR_ACT_TO_TBL, flags)
    body += _u32(FRA_PRIORITY, rule.priority) + _u32(FRA_TABLE, table) + nl_attr(FRA_PROTOCOL, bytes([RT_PROTO]))
    if rule.fwmask:
        body += _u32(FRA_FWMARK, rule.fwmark) + _u32(FRA_FWMASK, rule.fwmask)
    if rule.src:
        body += nl_attr(FRA_SRC, socket.inet_pton(AF[rule.family], rule.src))
    if rule.iif:
        body += nl_attr(FRA_IIFNAME, rule.iif.encode() + b"\0")
    if rule.uid_start >= 0:
        body += nl_attr(FRA_UID_RANGE, struct.pack("=II", rule.uid_start, rule.uid_end))
    return body


def route_message(route: Route, oif: int) -> bytes:
    """The body of RTM_NEWROUTE/RTM_DELROUTE for one of our routes (on-link without a gateway)."""
    family = AF[route.family]
    prefix, _, length = route.dst.partition("/")
    dst_len = int(length or (32 if route.family == 4 else 128))
    scope = RT_SCOPE_UNIVERSE if route.gateway else RT_SCOPE_LINK
    table = route.table
    body = _RTMSG.pack(family, dst_len, 0, 0, table if table < 256 else RT_TABLE_COMPAT, RT_PROTO, scope,
                       RTN_UNICAST, 0)
    body += _u32(RTA_TABLE, table) + _u32(RTA_OIF, oif)
    if dst_len:
        body += nl_attr(RTA_DST, socket.inet_pton(family, prefix))
    if route.gateway:
        body += nl_attr(RTA_GATEWAY, socket.inet_pton(family, route.gateway))
    if route.prefsrc:
        body += nl_attr(RTA_PREFSRC, socket.inet_pton(family, route.prefsrc))
    return body


def parse_rule(family: int, body: bytes) -> Tuple[Rule, int]:
    """(Rule, protocol) of an RTM_NEWRULE message."""
    _fam, _dst_len, src_len, _tos, table, _r1, _r2, _action, _flags = _RTMSG.unpack_from(body)
    attrs = nl_attrs(body, _RTMSG.size)
    if FRA_TABLE in attrs:
        table = struct.unpack("=I", attrs[FRA_TABLE])[0]
    fwmark = struct.unpack("=I", attrs[FRA_FWMARK])[0] if FRA_FWMARK in attrs else 0
    fwmask = struct.unpack("=I", attrs[FRA_FWMASK])[0] if FRA_FWMARK in attrs and FRA_FWMASK in attrs else 0
    if fwmark and not fwmask:
        fwmask = U32
    src = socket.inet_ntop(AF[family], attrs[FRA_SRC]) if src_len and FRA_SRC in attrs else None
    iif = attrs[FRA_IIFNAME].split(b"\0", 1)[0].decode(errors="replace") if FRA_IIFNAME in attrs else None
    uid_start, uid_end = struct.unpack("=II", attrs[FRA_UID_RANGE]) if FRA_UID_RANGE in attrs else (-1, -1)
    rule = Rule(family=family, priority=struct.unpack("=I", attrs[FRA_PRIORITY])[0] if FRA_PRIORITY in attrs else 0,
                table=table, fwmark=fwmark, fwmask=fwmask, src=src, src_len=src_len if src else 0, iif=iif or None,
                uid_start=uid_start, uid_end=uid_end)
    return rule, attrs[FRA_PROTOCOL][0] if FRA_PROTOCOL in attrs else 0


def parse_route(family: int, body: bytes, names: Dict[Optional[int], str]) -> Tuple[Route, int]:
    """(Route, protocol) of an RTM_NEWROUTE message."""
    _fam, dst_len, _src_len, _tos, table, proto, _scope, _type, _flags = _RTMSG.unpack_from(body)
    attrs = nl_attrs(body, _RTMSG.size)
    if RTA_TABLE in attrs:
        table = struct.unpack("=I", attrs[RTA_TABLE])[0]
    af = AF[family]
    dst = f"{socket.inet_ntop(af, attrs[RTA_DST])}/{dst_len}" if RTA_DST in attrs else _DEFAULT[family]
    oif = struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
    if oif not in names:
        names[oif] = _ifname(oif)
    return Route(family=family, table=table, dst=dst, oif=names[oif],
                 gateway=socket.inet_ntop(af, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else None,
                 prefsrc=socket.inet_ntop(af, attrs[RTA_PREFSRC]) if RTA_PREFSRC in attrs else None), proto


class Rtnl:
    """One rtnetlink socket in the current network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for option in (NETLINK_GET_STRICT_CHK, NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            try:  # the kernel filters route dumps by protocol and table itself; errors say why, briefly
                self.sock.setsockopt(SOL_NETLINK, option, 1)
            except OSError:
                pass  # old kernel: the filter below does it; errors are plain
        self.sock.bind((0, 0))
        self._seq = 0
        self._rule_dump: Dict[int, List[Tuple[Rule, int]]] = {}

    def close(self) -> None:
        self.sock.close()

    @property
    def portid(self) -> int:
        """The kernel's name for this socket (notifications of our changes carry it)."""
        return self.sock.getsockname()[0]

    def invalidate(self) -> None:
        """Forget what was read: the next reads ask the kernel again."""
        self._rule_dump.clear()

    # ---- the conversation ----------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def dump(self, msg_type: int, body: bytes) -> List[Tuple[int, bytes]]:
        """(type, body) of every message a dump request returns."""
        seq = self._next_seq()
        self.sock.send(HDR.pack(16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        out: List[Tuple[int, bytes]] = []
        while True:
            for kind, _flags, got, payload in nl_messages(self.sock.recv(1 << 20)):
                if got != seq:
                    continue
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code and code != errno.ENOENT:  # ENOENT: no such table, so nothing in it
                        raise _error("read the kernel's rules and routes", code)
                    return out
                out.append((kind, payload))

    def batch(self, requests: Sequence[Tuple[int, int, bytes]]) -> List[Tuple[int, str]]:
        """Send the (type, flags, body) requests a window at a time, one ``send`` each: (errno,
        the kernel's explanation) per request, (0, "") where done. The kernel processes them in
        order and answers only failures, and the ACK asked of a window's last request."""
        out: List[Tuple[int, str]] = []
        for start in range(0, len(requests), WINDOW):
            out += self._window(requests[start:start + WINDOW])
        return out

    def _window(self, requests: Sequence[Tuple[int, int, bytes]]) -> List[Tuple[int, str]]:
        seqs = [self._next_seq() for _ in requests]
        last = seqs[-1]
        self.sock.send(b"".join(
            HDR.pack(16 + len(body), kind, flags | NLM_F_REQUEST | (NLM_F_ACK if seq == last else 0), seq, 0) + body
            for seq, (kind, flags, body) in zip(seqs, requests)))
        answers: Dict[int, Tuple[int, str]] = {}
        while last not in answers:
            for kind, flags, seq, payload in nl_messages(self.sock.recv(1 << 20)):
                if kind == NLMSG_ERROR and len(payload) >= 4:
                    answers[seq] = (-struct.unpack_from("=i", payload)[0], _ext_ack(flags, payload))
        return [answers.get(seq, (0, "")) for seq in seqs]

    # ---- reading -------------------------------------------------------

    def _rules(self, family: int) -> List[Tuple[Rule, int]]:
        if family not in self._rule_dump:
            body = _RTMSG.pack(AF[family], 0, 0, 0, 0, 0, 0, 0, 0)
            self._rule_dump[family] = [parse_rule(family, payload) for kind, payload in self.dump(RTM_GETRULE, body)
                                       if kind == RTM_NEWRULE]
        return self._rule_dump[family]

    def _routes(self, family: int, proto: Optional[int] = None, table: Optional[int] = None) -> List[Tuple[Route, int]]:
        body = _RTMSG.pack(AF[family], 0, 0, 0, 0 if table is None else (table if table < 256 else RT_TABLE_COMPAT),
                           proto or 0, 0, 0, 0)
        if table is not None:
            body += _u32(RTA_TABLE, table)
        names: Dict[Optional[int], str] = {}
        out = []
        for kind, payload in self.dump(RTM_GETROUTE, body):
            if kind != RTM_NEWROUTE:
                continue
            route, got = parse_route(family, payload, names)
            # without strict checking (old kernels) the kernel ignores the filter: filter here too
            if (proto is None or got == proto) and (table is None or route.table == table):
                out.append((route, got))
        return out

    def our_rules(self) -> Set[Rule]:
        return {r for f in (4, 6) for r, proto in self._rules(f) if proto == RT_PROTO}

    def our_routes(self) -> Set[Route]:
        return {r for f in (4, 6) for r, _ in self._routes(f, proto=RT_PROTO)}

    def tables_with_foreign_routes(self) -> Set[int]:
        """Every table holding a route that is not ours: one dump of all routes, headers read only."""
        out: Set[int] = set()
        for family in (4, 6):
            for kind, payload in self.dump(RTM_GETROUTE, _RTMSG.pack(AF[family], 0, 0, 0, 0, 0, 0, 0, 0)):
                if kind != RTM_NEWROUTE or payload[5] == RT_PROTO:  # rtm_protocol
                    continue
                table = payload[4]  # rtm_table; tables past 255 only in RTA_TABLE
                if table == RT_TABLE_COMPAT and RTA_TABLE in (attrs := nl_attrs(payload, _RTMSG.size)):
                    table = struct.unpack("=I", attrs[RTA_TABLE])[0]
                out.add(table)
        return out

    def table_has_foreign_routes(self, table: int) -> bool:
        return any(proto != RT_PROTO for f in (4, 6) for _, proto in self._routes(f, table=table))

    def foreign_usage(self) -> ForeignUsage:
        priorities, marks = set(), []
        for family in (4, 6):
            for rule, proto in self._rules(family):
                if proto == RT_PROTO:
                    continue
                priorities.add((family, rule.priority))
                if rule.fwmask:
                    owner = rule_owner(rule.priority, rule.table, rule.fwmark, rule.fwmask)
                    marks.append((Fwmark(rule.fwmark, rule.fwmask), owner))
        return ForeignUsage(_ForeignTables(self), frozenset(priorities), tuple(marks))

    def addresses(self, iface: str) -> Set[str]:
        """The addresses the kernel holds on ``iface`` now (a dump the kernel filters by interface)."""
        return {ip for ip, _ in self.prefixes(iface)}

    def prefixes(self, iface: str) -> List[Tuple[str, int]]:
        """(address, prefix length) of each address the kernel holds on ``iface``, primary first."""
        index = _ifindex(iface)
        if index is None:
            return []
        out = []
        for family in (4, 6):
            body = struct.pack("=BBBBI", AF[family], 0, 0, 0, index)
            for kind, payload in self.dump(RTM_GETADDR, body):
                if kind != RTM_NEWADDR or len(payload) < 8:
                    continue
                if struct.unpack_from("=I", payload, 4)[0] != index:
                    continue  # without strict checking the kernel does not filter
                attrs = nl_attrs(payload, 8)
                raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
                if raw:
                    out.append((socket.inet_ntop(AF[family], raw), payload[1]))
        return out

    def gateways(self, iface: str) -> Dict[int, str]:
        """family -> the gateway of the main table's default route through ``iface``."""
        out: Dict[int, str] = {}
        for family in (4, 6):
            for route, _ in self._routes(family, table=254):
                if route.oif == iface and route.gateway and route.dst == _DEFAULT[family]:
                    out.setdefault(family, route.gateway)
        return out

    def unusable_addresses(self, iface: Optional[str] = None) -> Set[str]:
        """Addresses the kernel will not take as a route's source yet or at all: tentative
        (duplicate address detection running) or failed DAD; of ``iface`` alone when given (a
        dump the kernel filters by interface)."""
        out: Set[str] = set()
        index = _ifindex(iface) if iface else 0
        if index is None:
            return out
        for family in (4, 6):
            for kind, payload in self.dump(RTM_GETADDR, struct.pack("=BBBBI", AF[family], 0, 0, 0, index)):
                if kind != RTM_NEWADDR or len(payload) < 8:
                    continue
                if index and struct.unpack_from("=I", payload, 4)[0] != index:
                    continue  # without strict checking the kernel does not filter
                attrs = nl_attrs(payload, 8)
                flags = struct.unpack("=I", attrs[IFA_FLAGS])[0] if IFA_FLAGS in attrs else payload[2]
                raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
                if raw and flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                    out.add(socket.inet_ntop(AF[family], raw))
        return out

    # ---- writing -------------------------------------------------------

    def add_rules(self, rules: Sequence[Rule]) -> List[Optional[Exception]]:
        """Add many rules in one batch (an identical rule already there is fine): each one's error."""
        errors = self._each("add", rules, RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, rule_message, (errno.EEXIST,))
        self.rules_changed([r for r, e in zip(rules, errors) if e is None], [])
        return errors

    def del_rules(self, rules: Sequence[Rule]) -> List[Optional[Exception]]:
        """Delete many of our rules in one batch (one already gone is fine): each one's error."""
        errors = self._each("delete", rules, RTM_DELRULE, 0, rule_message, (errno.ENOENT,))
        self.rules_changed([], [r for r, e in zip(rules, errors) if e is None])
        return errors

    def rules_changed(self, added: Sequence[Rule], deleted: Sequence[Rule]) -> None:
        """Our rules changed: forget the rule dump (the resident kernel updates it instead)."""
        if added or deleted:
            self._rule_dump.clear()

    def add_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        """Add (replace) many routes in one batch: each one's error."""
        return self._each("add", routes, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, None, ())

    def del_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        """Delete many of our routes in one batch (one already gone, with its link or not, is fine)."""
        return self._each("delete", routes, RTM_DELROUTE, 0, None, (errno.ESRCH, errno.ENOENT))

    def _each(self, verb: str, entries: Sequence, msg_type: int, flags: int,
              message: Optional[Callable[[Rule], bytes]], ok: Tuple[int, ...]) -> List[Optional[Exception]]:
        """One batch for ``entries`` (rules with ``message``, else routes by their interface's index):
        the error of each, None where done."""
        errors: List[Optional[Exception]] = [None] * len(entries)
        requests, sent = [], []
        indexes: Dict[str, Optional[int]] = {}
        for i, entry in enumerate(entries):
            if message is not None:
                body = message(entry)
            else:
                if entry.oif not in indexes:
                    indexes[entry.oif] = _ifindex(entry.oif)
                index = indexes[entry.oif]
                if index is None:  # deleting: the link is gone, and its routes with it
                    if verb == "add":
                        errors[i] = KernelError(f"cannot install {entry}: interface {entry.oif} does not exist")
                    continue
                body = route_message(entry, index)
            requests.append((msg_type, flags, body))
            sent.append(i)
        for i, (code, why) in zip(sent, self.batch(requests)):
            if code and code not in ok:
                errors[i] = _error(f"{verb} {entries[i]}", code, why)
        return errors


class _ForeignTables:
    """``table in tables``: does the kernel hold routes that are not ours in it? Asked per table
    (a dump the kernel filters), remembered for one reconcile; past a few tables (a reconcile
    from scratch probes one per connection), one dump of every route answers all."""

    def __init__(self, rtnl: Rtnl) -> None:
        self._rtnl = rtnl
        self._known: Dict[int, bool] = {}
        self._all: Optional[Set[int]] = None

    def __contains__(self, table: object) -> bool:
        if not isinstance(table, int) or table in _RESERVED_TABLES:
            return False
        if self._all is not None:
            return table in self._all
        if len(self._known) >= TABLES_ASKED_ONE_BY_ONE:
            self._all = self._rtnl.tables_with_foreign_routes()
            return table in self._all
        if table not in self._known:
            self._known[table] = self._rtnl.table_has_foreign_routes(table)
        return self._known[table]


def _ext_ack(flags: int, payload: bytes) -> str:
    """The kernel's own words about an error (NETLINK_EXT_ACK), or ''."""
    if not flags & NLM_F_ACK_TLVS or len(payload) < 20:
        return ""
    length = struct.unpack_from("=I", payload, 4)[0]  # the request echoed: its header only (NETLINK_CAP_ACK)
    offset = 4 + (16 if flags & NLM_F_CAPPED else length)
    text = nl_attrs(payload, offset).get(NLMSGERR_ATTR_MSG, b"")
    return text.split(b"\0", 1)[0].decode(errors="replace")


def _error(what: str, code: int, why: str = "") -> Exception:
    if code == errno.EPERM:
        return NotPermittedError(f"cannot {what}: not permitted (needs root or CAP_NET_ADMIN)")
    return KernelError(f"the kernel refused to {what}: {os.strerror(code)}{f' ({why})' if why else ''}")

