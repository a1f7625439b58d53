"""Rules and routes over netlink (pyroute2): read what is ours, add and delete entries.

What is ours carries the protocol tag RT_PROTO; everything else is only read, to
learn which tables and priorities foreign owners use. pyroute2 is imported here
and nowhere else, lazily, because importing it costs ~400 ms.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Dict, List, Optional, Set, Tuple

from ..errors import KernelError, NotPermittedError
from ..model import RT_PROTO, ForeignUsage, Fwmark, Route, Rule
from ..owners import rule_owner

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}
_RESERVED_TABLES = {0, 253, 254, 255}
U32 = 0xFFFFFFFF


class Netlink:
    """One netlink socket in the current network namespace."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute  # lazy: see module docstring

        self._ipr = IPRoute()
        self._names: Dict[int, str] = {}

    def close(self) -> None:
        self._ipr.close()

    # ---- reading -------------------------------------------------------

    def ifindex(self, name: str) -> Optional[int]:
        found = self._ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def link_names(self) -> Dict[int, str]:
        self._names = {link["index"]: link.get("ifname") for link in self._ipr.get_links()}
        return self._names

    def _rules(self, family: int) -> List[Tuple[Rule, int]]:
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
            )
            if rule.fwmark and not rule.fwmask:
                rule = Rule(rule.family, rule.priority, rule.table, rule.fwmark, U32, rule.src, rule.src_len)
            out.append((rule, msg.get("protocol") or 0))
        return out

    def _routes(self, family: int) -> List[Tuple[Route, int]]:
        names = self.link_names()
        out = []
        for msg in self._ipr.route("dump", family=_AF[family]):
            table = msg.get("table") or msg["table"]
            dst = msg.get("dst")
            dst = f"{dst}/{msg['dst_len']}" if dst else _DEFAULT[family]
            oif = msg.get("oif")
            route = Route(
                family=family,
                table=table,
                dst=dst,
                oif=names.get(oif, str(oif)),
                gateway=msg.get("gateway"),
                prefsrc=msg.get("prefsrc"),
            )
            out.append((route, msg["proto"]))
        return out

    def our_rules(self) -> Set[Rule]:
        return {r for f in (4, 6) for r, proto in self._rules(f) if proto == RT_PROTO}

    def our_routes(self) -> Set[Route]:
        return {r for f in (4, 6) for r, proto in self._routes(f) if proto == RT_PROTO}

    def foreign_usage(self) -> ForeignUsage:
        tables, priorities, marks = set(), set(), []
        for family in (4, 6):
            for rule, proto in self._rules(family):
                if proto == RT_PROTO:
                    continue
                priorities.add((family, rule.priority))
                if rule.fwmask:
                    owner = rule_owner(rule.priority, rule.table, rule.fwmark, rule.fwmask)
                    marks.append((Fwmark(rule.fwmark, rule.fwmask), owner))
            for route, proto in self._routes(family):
                if proto != RT_PROTO and route.table not in _RESERVED_TABLES:
                    tables.add((family, route.table))
        return ForeignUsage(frozenset(tables), frozenset(priorities), tuple(marks))

    def table_routes(self, table: int) -> List[Tuple[Route, int]]:
        return [(r, p) for f in (4, 6) for r, p in self._routes(f) if r.table == table]

    # ---- for explain ---------------------------------------------------

    def fib_rules(self, destination: str) -> list:
        family = 6 if ":" in destination else 4
        return [_fib_rule(msg) for msg in self._ipr.get_rules(family=_AF[family])]

    def fib_routes(self, destination: str) -> dict:
        from .. import fib

        family = 6 if ":" in destination else 4
        names = self.link_names()
        tables: Dict[int, list] = {}
        for msg in self._ipr.route("dump", family=_AF[family]):
            dst = msg.get("dst")
            table = msg.get("table") or msg["table"]
            tables.setdefault(table, []).append(fib.FibRoute(
                table=table, dst=f"{dst}/{msg['dst_len']}" if dst else _DEFAULT[family], type=msg["type"],
                metric=msg.get("priority") or 0, gateway=msg.get("gateway"),
                oif=names.get(msg.get("oif")), prefsrc=msg.get("prefsrc"), protocol=msg["proto"]))
        return tables

    def route_get(self, destination: str, source: Optional[str], mark: int) -> Dict[str, Any]:
        """The kernel's own answer for a locally generated packet."""
        from pyroute2 import NetlinkError

        args: Dict[str, Any] = {"dst": destination}
        if source:
            args["src"] = source
        if mark:
            args["mark"] = mark
        try:
            msg = self._ipr.route("get", **args)[0]
        except NetlinkError as exc:
            return {"error": exc.args[1] if len(exc.args) > 1 else str(exc)}
        names = self.link_names()
        return {"table": msg.get("table") or msg["table"], "dev": names.get(msg.get("oif")),
                "gateway": msg.get("gateway"), "src": msg.get("prefsrc")}

    # ---- writing -------------------------------------------------------

    def _rule_args(self, rule: Rule) -> dict:
        args = dict(family=_AF[rule.family], priority=rule.priority, table=rule.table, protocol=RT_PROTO)
        if rule.fwmask:
            args.update(fwmark=rule.fwmark, fwmask=rule.fwmask)
        if rule.src:
            args.update(src=rule.src, src_len=rule.src_len)
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

    @staticmethod
    def _call(what: str, fn, *args, ok: Tuple[int, ...] = (), **kwargs) -> None:
        from pyroute2 import NetlinkError

        try:
            fn(*args, **kwargs)
        except NetlinkError as exc:
            if exc.code in ok:
                return
            if exc.code == errno.EPERM:
                raise NotPermittedError(f"cannot {what}: not permitted (needs root or CAP_NET_ADMIN)") from exc
            raise KernelError(f"the kernel refused to {what}: {exc.args[1] if len(exc.args) > 1 else exc}") from exc


def _fib_rule(msg: Any) -> "fib.FibRule":
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
