"""``explain``: how a packet would be routed, which rule decided, and the answer without our policy.

The answer "with" is the kernel's own (RTM_GETROUTE with the mark our nft marking
would give); the deciding rule and the answer "without" come from :mod:`fib`, fed
with the kernel's rules and routes.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Dict, Optional, Tuple

from . import fib
from .errors import PolicyRoutingError
from .model import RT_PROTO
from .policy import parse_number


def _uid(text: str) -> int:
    """A uid, or a user name looked up."""
    if text.isascii() and text.isdigit():
        return int(text)
    import pwd

    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"unknown user {text!r}") from None


def _route_json(rule: Optional[fib.FibRule], route: Optional[fib.FibRoute]) -> Dict[str, Any]:
    return {
        "rule": rule.describe() if rule else None,
        "rule_priority": rule.priority if rule else None,
        "ours": bool(rule and rule.protocol == RT_PROTO),
        "table": rule.table if rule else None,
        "route": None if route is None else {"dst": route.dst, "gateway": route.gateway, "dev": route.oif,
                                             "src": route.prefsrc},
        "dev": route.oif if route else None,
        "src": route.prefsrc if route else None,
    }


def _unit_mark(unit: str, base_mark: int) -> Tuple[int, Optional[str]]:
    """The mark our socket program gives a new socket of ``unit`` (or of ``cgroup:/PATH``)."""
    from .adapters import cgroupbpf, cgroups

    target = unit if unit.startswith(("unit:", "cgroup:")) else f"unit:{unit}"
    path = cgroups.path_of(target)
    if path is None:
        return base_mark, f"{target} has no cgroup now (not running, or no cgroup2): its sockets get no mark"
    marks = cgroupbpf.attached(path)
    for _, (value, mask) in marks:
        base_mark = (base_mark & ~mask) | value
    if not marks:
        return base_mark, f"{target} (cgroup {path}): no socket mark of ours"
    return base_mark, f"socket mark 0x{base_mark:x} for {target} (cgroup {path})"


def explain(destination: str, source: Optional[str] = None, iif: Optional[str] = None,
            mark: Optional[str] = None, uid: Optional[str] = None, unit: Optional[str] = None) -> Dict[str, Any]:
    try:
        ipaddress.ip_address(destination)
        if source:
            ipaddress.ip_address(source)
        base_mark = parse_number(mark) if mark else 0
        uid_number = _uid(uid) if uid is not None else None
    except ValueError as exc:
        raise PolicyRoutingError(f"explain: {exc}; give addresses like 10.0.9.2, a mark like 0x1, "
                                 "a uid like 1000 or a user name") from None
    from .adapters.netlink import Netlink
    from .adapters.nftables import Nftables

    marks, _, _ = Nftables().our_marks()
    our_mark = base_mark
    marked_by = None
    for m in marks:
        if m.direction == "incoming" and m.iface == iif:
            our_mark = (base_mark & ~m.mask) | m.value
            marked_by = str(m)
    if unit:
        our_mark, marked_by = _unit_mark(unit, our_mark)
    netlink = Netlink()
    try:
        rules, routes = netlink.fib_rules(destination), netlink.fib_routes(destination)
        kernel = netlink.route_get(destination, source, our_mark, uid_number)
    finally:
        netlink.close()
    owner = uid_number if uid_number is not None else os.getuid()
    with_rule, with_route = fib.lookup(rules, routes, fib.Packet(destination, source, our_mark, uid=owner))
    theirs = [r for r in rules if r.protocol != RT_PROTO]
    without_rule, without_route = fib.lookup(theirs, routes, fib.Packet(destination, source, base_mark, uid=owner))
    answer: Dict[str, Any] = {
        "destination": destination, "source": source, "iif": iif, "uid": uid_number, "unit": unit,
        "mark": f"0x{our_mark:x}", "marked_by": marked_by,
        "with_policy": dict(_route_json(with_rule, with_route), kernel=kernel),
        "without_policy": _route_json(without_rule, without_route),
    }
    answer["changed_by_policy"] = (answer["with_policy"]["dev"], answer["with_policy"]["route"]) != \
        (answer["without_policy"]["dev"], answer["without_policy"]["route"])
    return answer


def explain_text(a: Dict[str, Any]) -> str:
    lines = [f"packet to {a['destination']}" + (f" from {a['source']}" if a["source"] else "")
             + (f" of a socket of uid {a['uid']}" if a.get("uid") is not None else "")
             + (f" of a socket of {a['unit']}" if a.get("unit") else "")
             + (f", the reply of a connection that came in on {a['iif']}" if a["iif"] else "")]
    if a["marked_by"] and a.get("unit"):
        lines.append(f"  {a['marked_by']}")
    elif a["marked_by"]:
        lines.append(f"  our marking gives it mark {a['mark']} ({a['marked_by']})")
    elif a["mark"] != "0x0":
        lines.append(f"  mark {a['mark']}")
    for title, key in (("with the policy", "with_policy"), ("without our policy", "without_policy")):
        part = a[key]
        if key == "without_policy" and not a["changed_by_policy"]:
            lines.append("  our policy does not change this answer")
            break
        route = part["route"]
        lines.append(f"  {title}:")
        lines.append(f"    rule   {part['rule'] or '(none matched: no route)'}" + ("   <- ours" if part["ours"] else ""))
        if route:
            via = f" via {route['gateway']}" if route["gateway"] else ""
            lines.append(f"    table  {part['table']}: {route['dst']}{via} dev {route['dev']}"
                         + (f" src {route['src']}" if route["src"] else ""))
            lines.append(f"    leaves by {route['dev']}")
        kernel = part.get("kernel")
        if kernel and kernel.get("dev") != part["dev"]:
            lines.append(f"    (the kernel answers dev {kernel.get('dev')} table {kernel.get('table')})")
    return "\n".join(lines) + "\n"
