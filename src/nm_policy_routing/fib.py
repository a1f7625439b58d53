"""Pure: a small model of the kernel's policy routing lookup (rules in order, longest prefix).

Used by ``explain`` to name the rule that matched and to answer "what would happen
without our policy" (the kernel cannot be asked to ignore some of its rules).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

U32 = 0xFFFFFFFF
TO_TABLE, GOTO, NOP = 1, 2, 3
TERMINAL = {6: "blackhole", 7: "unreachable", 8: "prohibit"}
UNICAST, LOCAL = 1, 2


@dataclass(frozen=True)
class FibRule:
    priority: int
    table: int
    action: int = TO_TABLE
    src: Optional[str] = None
    dst: Optional[str] = None
    fwmark: int = 0
    fwmask: int = 0
    iif: Optional[str] = None
    oif: Optional[str] = None
    invert: bool = False
    suppress_prefixlen: int = -1
    protocol: int = 0
    uid_start: int = -1
    uid_end: int = -1

    def describe(self) -> str:
        words = [f"{self.priority}:"]
        if self.invert:
            words.append("not")
        words.append(f"from {self.src or 'all'}")
        if self.dst:
            words.append(f"to {self.dst}")
        if self.fwmask:
            words.append(f"fwmark 0x{self.fwmark:x}/0x{self.fwmask:x}")
        if self.iif:
            words.append(f"iif {self.iif}")
        if self.oif:
            words.append(f"oif {self.oif}")
        if self.uid_start >= 0:
            words.append(f"uidrange {self.uid_start}-{self.uid_end}")
        table = {253: "default", 254: "main", 255: "local"}.get(self.table, str(self.table))
        words.append(TERMINAL.get(self.action, f"lookup {table}"))
        if self.suppress_prefixlen >= 0:
            words.append(f"suppress_prefixlength {self.suppress_prefixlen}")
        if self.protocol:
            words.append(f"proto {self.protocol}")
        return " ".join(words)


@dataclass(frozen=True)
class FibRoute:
    table: int
    dst: str
    type: int = UNICAST
    metric: int = 0
    gateway: Optional[str] = None
    oif: Optional[str] = None
    prefsrc: Optional[str] = None
    protocol: int = 0

    @property
    def network(self):
        return ipaddress.ip_network(self.dst, strict=False)


@dataclass(frozen=True)
class Packet:
    dst: str
    src: Optional[str] = None
    mark: int = 0
    iif: str = "lo"  # locally generated
    uid: int = 0  # the socket owner's uid (a forwarded packet's: none, never in a uid range)


def _in(addr: Optional[str], prefix: Optional[str]) -> bool:
    if prefix is None:
        return True
    if addr is None:
        return False
    return ipaddress.ip_address(addr) in ipaddress.ip_network(prefix, strict=False)


def rule_matches(rule: FibRule, pkt: Packet) -> bool:
    # a socket without a source yet looks up with the unspecified address (0.0.0.0 or ::)
    src = pkt.src or ("::" if ":" in pkt.dst else "0.0.0.0")
    hit = (_in(src, rule.src) and _in(pkt.dst, rule.dst)
           and (rule.uid_start < 0 or (pkt.iif == "lo" and rule.uid_start <= pkt.uid <= rule.uid_end))
           and (pkt.mark & rule.fwmask) == (rule.fwmark & rule.fwmask)
           and (rule.iif is None or rule.iif == pkt.iif) and rule.oif is None)
    return hit != rule.invert


def longest_match(routes: Iterable[FibRoute], dst: str) -> Optional[FibRoute]:
    addr = ipaddress.ip_address(dst)
    best: Optional[Tuple[int, int, FibRoute]] = None
    for route in routes:
        net = route.network
        if net.version == addr.version and addr in net:
            key = (-net.prefixlen, route.metric)
            if best is None or key < best[:2]:
                best = (key[0], key[1], route)
    return best[2] if best else None


def lookup(rules: List[FibRule], routes: Dict[int, List[FibRoute]], pkt: Packet
           ) -> Tuple[Optional[FibRule], Optional[FibRoute]]:
    """The rule that decided and the route it found (None, None: no route to host)."""
    for rule in sorted(rules, key=lambda r: r.priority):
        if not rule_matches(rule, pkt) or rule.action in (NOP, GOTO):
            continue
        if rule.action in TERMINAL:
            return rule, None
        route = longest_match(routes.get(rule.table, []), pkt.dst)
        if route is None:
            continue
        if rule.suppress_prefixlen >= 0 and route.network.prefixlen <= rule.suppress_prefixlen:
            continue
        return rule, route
    return None, None
