"""Rules and routes over netlink (pyroute2): read what is ours, add and delete entries.

What is ours carries the protocol tag RT_PROTO; everything else is only read, to
learn which tables and priorities foreign owners use. pyroute2 is imported here
and nowhere else, lazily, because importing it costs ~400 ms.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any, Dict, List, Optional, Set, Tuple

from ..errors import KernelError, NotPermittedError
from ..model import RT_PROTO, ForeignUsage, Fwmark, Route, Rule
from ..owners import rule_owner

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}
_RESERVED_TABLES = {0, 253, 254, 255}
U32 = 0xFFFFFFFF
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40


class _ForeignTables:
    """``table in tables``: does the kernel hold routes that are not ours in it? Asked per table
    (a dump the kernel filters), remembered for one reconcile."""

    def __init__(self, netlink: "Netlink") -> None:
        self._netlink = netlink
        self._known: Dict[int, bool] = {}

    def __contains__(self, table: object) -> bool:
        if not isinstance(table, int) or table in _RESERVED_TABLES:
            return False
        if table not in self._known:
            self._known[table] = self._netlink.table_has_foreign_routes(table)
        return self._known[table]


def import_iproute():
    """pyroute2's IPRoute without pyroute2/__init__.py, which imports everything (~100 ms more).

    The package module is registered bare (its path only), so that submodules import
    on their own; a pyroute2 already imported in full is used as it is.
    """
    import importlib.util
    import sys
    import types

    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is not None and spec.submodule_search_locations:
            bare = types.ModuleType("pyroute2")
            bare.__path__ = list(spec.submodule_search_locations)
            bare.__spec__ = spec
            bare.__file__ = spec.origin
            sys.modules["pyroute2"] = bare
    from pyroute2.iproute.linux import IPRoute

    return IPRoute


def import_netlink_error():
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


class Netlink:
    """One netlink socket in the current network namespace."""

    def __init__(self) -> None:
        IPRoute = import_iproute()
        try:  # strict checking lets the kernel filter dumps (by protocol, table)
            self._ipr = IPRoute(strict_check=True)
        except TypeError:
            self._ipr = IPRoute()
        self._rule_dump: Dict[int, List[Tuple[Rule, int]]] = {}

    def invalidate(self) -> None:
        """Forget what was read: the next reads ask the kernel again."""
        self._rule_dump.clear()

    def close(self) -> None:
        self._ipr.close()

    # ---- reading -------------------------------------------------------

    @staticmethod
    def ifindex(name: str) -> Optional[int]:
        """libc's if_nametoindex (an ioctl in this namespace): no link dump."""
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return None

    @staticmethod
    def ifname(index: Optional[int]) -> str:
        if index is None:
            return ""
        try:
            return socket.if_indextoname(index)
        except OSError:
            return str(index)

    def _rules(self, family: int) -> List[Tuple[Rule, int]]:
        if family not in self._rule_dump:
            self._rule_dump[family] = self._read_rules(family)
        return self._rule_dump[family]

    def _read_rules(self, family: int) -> List[Tuple[Rule, int]]:
        out = []
        for msg in self._ipr.get_rules(family=_AF[family]):
            table = msg.get("table") or msg["table"]
            rule = Rule(
                family=family,
                priority=msg.get("priority") or 0,
                table=table,
                fwmark=msg.get("fwmark") or 0,
                fwmask=(msg.get("fwmask") or 0) if msg.get("fwmark") is not None else 0,
                src=msg.get("src") if msg["src_len"] else None,
                src_len=msg["src_len"],
                iif=msg.get("iifname") or None,
            )
            if rule.fwmark and not rule.fwmask:
                rule = Rule(rule.family, rule.priority, rule.table, rule.fwmark, U32, rule.src, rule.src_len,
                            rule.iif)
            out.append((rule, msg.get("protocol") or 0))
        return out

    def _dump_routes(self, family: int, proto: Optional[int] = None, table: Optional[int] = None) -> list:
        """A route dump the kernel filters itself (strict checking): by protocol and/or table."""
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
        from pyroute2.netlink.rtnl import RTM_GETROUTE
        from pyroute2.netlink.rtnl.rtmsg import rtmsg

        msg = rtmsg()
        msg["family"] = _AF[family]
        if proto is not None:
            msg["proto"] = proto
        if table is not None:
            msg["table"] = table if table < 256 else 252  # RT_TABLE_COMPAT, the attribute says it
            msg["attrs"] = [("RTA_TABLE", table)]
        status = getattr(self._ipr, "status", None)
        if isinstance(status, dict):
            status.setdefault("nlm_generator", False)  # pyroute2 0.9.7's sync nlm_request needs it
        replies = list(self._ipr.nlm_request(msg, msg_type=RTM_GETROUTE, msg_flags=NLM_F_REQUEST | NLM_F_DUMP))
        # without strict checking (old kernels) the kernel ignores the filter: filter here too
        return [m for m in replies if (proto is None or m["proto"] == proto)
                and (table is None or (m.get("table") or m["table"]) == table)]

    def _read_routes(self, family: int, **filters: Any) -> List[Tuple[Route, int]]:
        names: Dict[Optional[int], str] = {}
        out = []
        for msg in self._dump_routes(family, **filters):
            table = msg.get("table") or msg["table"]
            dst = msg.get("dst")
            dst = f"{dst}/{msg['dst_len']}" if dst else _DEFAULT[family]
            oif = msg.get("oif")
            route = Route(
                family=family,
                table=table,
                dst=dst,
                oif=names[oif] if oif in names else names.setdefault(oif, self.ifname(oif)),
                gateway=msg.get("gateway"),
                prefsrc=msg.get("prefsrc"),
            )
            out.append((route, msg["proto"]))
        return out

    def our_rules(self) -> Set[Rule]:
        return {r for f in (4, 6) for r, proto in self._rules(f) if proto == RT_PROTO}

    def our_routes(self) -> Set[Route]:
        return {r for f in (4, 6) for r, _ in self._read_routes(f, proto=RT_PROTO)}

    def table_has_foreign_routes(self, table: int) -> bool:
        return any(proto != RT_PROTO for f in (4, 6) for _, proto in self._read_routes(f, table=table))

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

    def unusable_addresses(self) -> Set[str]:
        """Addresses the kernel will not take as a route's source yet or at all: tentative
        (duplicate address detection running) or failed DAD."""
        out = set()
        for msg in self._ipr.get_addr():
            flags = msg.get("IFA_FLAGS")
            flags = msg["flags"] if flags is None else flags
            if flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
                if address:
                    out.add(str(ipaddress.ip_address(address)))
        return out

    # ---- for explain ---------------------------------------------------

    def fib_rules(self, destination: str) -> list:
        family = 6 if ":" in destination else 4
        return [_fib_rule(msg) for msg in self._ipr.get_rules(family=_AF[family])]

    def fib_routes(self, destination: str) -> dict:
        from .. import fib

        family = 6 if ":" in destination else 4
        tables: Dict[int, list] = {}
        for msg in self._ipr.route("dump", family=_AF[family]):
            dst = msg.get("dst")
            table = msg.get("table") or msg["table"]
            tables.setdefault(table, []).append(fib.FibRoute(
                table=table, dst=f"{dst}/{msg['dst_len']}" if dst else _DEFAULT[family], type=msg["type"],
                metric=msg.get("priority") or 0, gateway=msg.get("gateway"),
                oif=self.ifname(msg.get("oif")) or None, prefsrc=msg.get("prefsrc"), protocol=msg["proto"]))
        return tables

    def route_get(self, destination: str, source: Optional[str], mark: int) -> Dict[str, Any]:
        """The kernel's own answer for a locally generated packet."""
        NetlinkError = import_netlink_error()

        args: Dict[str, Any] = {"dst": destination}
        if source:
            args["src"] = source
        if mark:
            args["mark"] = mark
        try:
            msg = self._ipr.route("get", **args)[0]
        except NetlinkError as exc:
            return {"error": exc.args[1] if len(exc.args) > 1 else str(exc)}
        return {"table": msg.get("table") or msg["table"], "dev": self.ifname(msg.get("oif")) or None,
                "gateway": msg.get("gateway"), "src": msg.get("prefsrc")}

    # ---- writing -------------------------------------------------------

    def _rule_args(self, rule: Rule) -> dict:
        args = dict(family=_AF[rule.family], priority=rule.priority, table=rule.table, protocol=RT_PROTO)
        if rule.fwmask:
            args.update(fwmark=rule.fwmark, fwmask=rule.fwmask)
        if rule.src:
            args.update(src=rule.src, src_len=rule.src_len)
        if rule.iif:
            args.update(iifname=rule.iif)
        return args

    def _route_args(self, route: Route) -> dict:
        index = self.ifindex(route.oif)
        if index is None:
            raise KernelError(f"cannot install {route}: interface {route.oif} does not exist")
        args = dict(family=_AF[route.family], dst=route.dst, table=route.table, oif=index, proto=RT_PROTO)
        if route.gateway:
            args["gateway"] = route.gateway
        else:  # on-link, as `ip route` does it
            args["scope"] = 253
        if route.prefsrc:
            args["prefsrc"] = route.prefsrc
        return args

    def add_rule(self, rule: Rule) -> None:
        self._call(f"add {rule}", self._ipr.rule, "add", ok=(errno.EEXIST,), **self._rule_args(rule))

    def del_rule(self, rule: Rule) -> None:
        self._call(f"delete {rule}", self._ipr.rule, "del", ok=(errno.ENOENT,), **self._rule_args(rule))

    def add_route(self, route: Route) -> None:
        self._call(f"add {route}", self._ipr.route, "replace", **self._route_args(route))

    def del_route(self, route: Route) -> None:
        index = self.ifindex(route.oif)
        if index is None:  # the link is gone, and its routes with it
            return
        self._call(f"delete {route}", self._ipr.route, "del", ok=(errno.ESRCH, errno.ENOENT),
                   **self._route_args(route))

    def _call(self, what: str, fn, *args, ok: Tuple[int, ...] = (), **kwargs) -> None:
        NetlinkError = import_netlink_error()
        self._rule_dump.clear()
        try:
            fn(*args, **kwargs)
        except NetlinkError as exc:
            if exc.code in ok:
                return
            if exc.code == errno.EPERM:
                raise NotPermittedError(f"cannot {what}: not permitted (needs root or CAP_NET_ADMIN)") from exc
            raise KernelError(f"the kernel refused to {what}: {exc.args[1] if len(exc.args) > 1 else exc}") from exc


def _fib_rule(msg: Any) -> Any:
    """A rule message as the fib model's FibRule."""
    from .. import fib

    def prefix(key: str, length: int) -> Optional[str]:
        value = msg.get(key)
        return f"{value}/{length}" if value and length else None

    suppress = msg.get("suppress_prefixlen")
    return fib.FibRule(
        priority=msg.get("priority") or 0, table=msg.get("table") or msg["table"], action=msg["action"],
        src=prefix("src", msg["src_len"]), dst=prefix("dst", msg["dst_len"]),
        fwmark=msg.get("fwmark") or 0,
        fwmask=(msg.get("fwmask") if msg.get("fwmask") is not None else U32) if msg.get("fwmark") else 0,
        iif=msg.get("iifname"), oif=msg.get("oifname"), invert=bool(msg["flags"] & 2),
        suppress_prefixlen=-1 if suppress is None or suppress == U32 else suppress,
        protocol=msg.get("protocol") or 0,
    )
