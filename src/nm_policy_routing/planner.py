"""The planner: active connections + policies -> the complete desired kernel state.

Pure: plain data in, plain data out, no I/O. ``auto`` tables, priorities and marks
are deterministic per connection UUID, keep the allocation a connection had before
(so one connection's arrival never moves another's), and avoid what foreign owners
use. A connection whose policy is invalid or conflicts gets an error and no entries.
Never evict: a connection that holds an allocation (its policy is applied) keeps its
interface, table, priority and mark; a newcomer claiming one of them is refused.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import (TYPE_CHECKING, Callable, Container, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Set, Tuple)

from . import apps
from .errors import PolicyError
from .model import (
    AUTO_MARK_MASK,
    AUTO_PRIORITY_RANGE,
    AUTO_TABLE_RANGE,
    Address,
    Allocation,
    Connection,
    ConnectionPlan,
    ForeignUsage,
    Fwmark,
    KernelState,
    Mark,
    Policy,
    Route,
    Rule,
    Sysctl,
    real_gateway,
    dataclass,
    field,
    replace,
)
from .policy import parse_policy

try:  # the interpreter's own SHA-256: hashlib loads OpenSSL's libcrypto, ~3 ms at every hook run
    from _sha2 import sha256  # Python 3.12+
except ImportError:
    try:
        from _sha256 import sha256  # Python 3.9-3.11
    except ImportError:
        from hashlib import sha256

if TYPE_CHECKING:
    from .config import Defaults

RP_FILTER = {"off": 0, "strict": 1, "loose": 2}
#: the per-interface IPv4 sysctls a policy may set (scoped.py finds their recorded originals by them)
SYSCTL_KEYS = SRC_VALID_MARK, RP_FILTER_KEY = ("src_valid_mark", "rp_filter")
MAIN_TABLE = 254
_IFNAME = re.compile(r"[^\s/:]{1,15}\Z")
_DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}
#: said of the holder in a conflict: an applied policy is never evicted
_KEPT = ", which keeps it"


@dataclass(frozen=True)
class Plan:
    connections: Tuple[ConnectionPlan, ...] = ()

    @property
    def desired(self) -> KernelState:
        return KernelState.union(cp.state for cp in self.connections)

    @property
    def allocations(self) -> Dict[str, Allocation]:
        return {cp.connection.uuid: cp.allocation for cp in self.connections if cp.allocation}

    def get(self, uuid: str) -> Optional[ConnectionPlan]:
        return next((cp for cp in self.connections if cp.connection.uuid == uuid), None)


@functools.lru_cache(maxsize=1)
def rules_stamp() -> str:
    """Which validation rules a cached policy passed: a hash of the code that states them, so a
    new version re-validates every cached policy (no pydantic import: the hook uses the cache)."""
    digest = sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("policy.py", "model.py"):
        try:
            with open(os.path.join(here, name), "rb") as handle:
                digest.update(handle.read())
        except OSError:
            digest.update(os.urandom(8))  # unknown rules: never trust the cache
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def policy_key(user_data: Tuple[Tuple[str, str], ...], defaults: Tuple[Tuple[str, str], ...]) -> str:
    """What a validated policy is remembered by: its inputs and the rules it was validated by."""
    text = json.dumps([user_data, defaults, rules_stamp()], separators=(",", ":"))
    return sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=4096)
def _parse(user_data: Tuple[Tuple[str, str], ...], label: str, defaults: Tuple[Tuple[str, str], ...]) -> Policy:
    """parse_policy, remembered: the daemon re-plans every connection on each change."""
    return parse_policy(dict(user_data), label, dict(defaults))


def _policy(conn: Connection, defaults: Tuple[Tuple[str, str], ...], cache: Optional[Dict[str, Policy]]) -> Policy:
    """A connection's policy: from ``cache`` (policies validated before) or parsed now."""
    if cache is None:
        return _parse(conn.user_data, conn.label, defaults)
    key = policy_key(conn.user_data, defaults)
    if key not in cache:
        cache[key] = _parse(conn.user_data, conn.label, defaults)
    return cache[key]


def _hash(uuid: str, salt: str) -> int:
    return int.from_bytes(sha256(f"{salt}:{uuid}".encode()).digest()[:8], "big")


def _probe(uuid: str, salt: str, low: int, high: int, taken: Callable[[int], bool]) -> Optional[int]:
    span = high - low + 1
    start = _hash(uuid, salt) % span
    for step in range(span):
        candidate = low + (start + step) % span
        if not taken(candidate):
            return candidate
    return None


def _auto_marks() -> List[Fwmark]:
    shift = (AUTO_MARK_MASK & -AUTO_MARK_MASK).bit_length() - 1
    count = AUTO_MARK_MASK >> shift
    return [Fwmark(v << shift, AUTO_MARK_MASK) for v in range(1, count + 1)]


@dataclass
class _Allocator:
    foreign: ForeignUsage
    tables: Dict[int, str] = field(default_factory=dict)
    priorities: Dict[int, str] = field(default_factory=dict)
    marks: List[Tuple[Fwmark, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        #: asked one priority at a time (the container may be a lazy union: O(1), not O(rules))
        self.foreign_priorities = _AnyFamily(self.foreign.priorities)
        #: self.marks by mask, then value: two marks of one mask overlap only when equal
        self._by_mask: Dict[int, Dict[int, Tuple[Fwmark, str]]] = {}

    def table_taken(self, table: int) -> bool:
        return table in self.tables or table in self.foreign.tables

    def priority_taken(self, priority: int) -> bool:  # (no copy of the taken ones per connection)
        return priority in self.priorities or priority in self.foreign_priorities

    def mark_clash(self, mark: Fwmark) -> Optional[str]:
        for other, owner in self.foreign.marks:
            if other.overlaps(mark):
                return f"mark bits 0x{other.mask & mark.mask:x} are used by {owner} ({other})"
        for mask, values in _by_mask_items(self.foreign.held_marks, self._by_mask):  # O(masks in use)
            if mask == mark.mask:
                other = values.get(mark.value & mark.mask)
                if other is not None:
                    return f"fwmark {mark} overlaps {other[0]} of connection {other[1]}{_KEPT}"
                continue
            for other, owner in values.values():
                if other.overlaps(mark):
                    return f"fwmark {mark} overlaps {other} of connection {owner}{_KEPT}"
        return None

    def explicit(self, label: str, policy: Policy, previous: Optional[Allocation]) -> List[str]:
        problems = []
        if policy.table is not None:
            already_ours = previous is not None and previous.table == policy.table
            if not already_ours and policy.table in self.foreign.tables:
                problems.append(f"table {policy.table} already holds routes that are not ours; "
                                "choose another nm-policy-routing.table or 'auto'")
            elif policy.table in self.tables:
                problems.append(f"table {policy.table} is already used by connection "
                                f"{self.tables[policy.table]}{_KEPT}; choose another "
                                "nm-policy-routing.table or 'auto'")
        if policy.priority is not None:
            if policy.priority in self.foreign_priorities:
                problems.append(f"rule priority {policy.priority} already holds rules that are not "
                                "ours; choose another nm-policy-routing.priority or 'auto'")
            elif policy.priority in self.priorities:
                problems.append(f"rule priority {policy.priority} is already used by connection "
                                f"{self.priorities[policy.priority]}{_KEPT}; choose another "
                                "nm-policy-routing.priority or 'auto'")
        if policy.fwmark is not None and policy.uses_marks:
            clash = self.mark_clash(policy.fwmark)
            if clash:
                problems.append(f"fwmark {policy.fwmark}: {clash}; choose other bits with "
                                "nm-policy-routing.fwmark")
        return problems

    def take(self, label: str, policy: Policy, previous: Optional[Allocation],
             uuid: str) -> Tuple[Optional[Allocation], List[str]]:
        problems = []
        table = policy.table
        if table is None:
            # a table we already hold was checked when it was allocated
            if previous and previous.table not in self.tables \
                    and AUTO_TABLE_RANGE[0] <= previous.table <= AUTO_TABLE_RANGE[1]:
                table = previous.table
            else:
                table = _probe(uuid, "table", *AUTO_TABLE_RANGE, self.table_taken)
        priority = policy.priority
        if priority is None:
            if previous and previous.priority not in self.priorities \
                    and previous.priority not in self.foreign_priorities \
                    and AUTO_PRIORITY_RANGE[0] <= previous.priority <= AUTO_PRIORITY_RANGE[1]:
                priority = previous.priority
            else:
                priority = _probe(uuid, "priority", *AUTO_PRIORITY_RANGE, self.priority_taken)
        mark = policy.fwmark if policy.uses_marks else None
        if policy.uses_marks and mark is None:
            mark = self._auto_mark(uuid, previous, problems)
        if table is None:
            problems.append("no free routing table left in the auto range")
        if priority is None:
            problems.append("no free rule priority left in the auto range")
        if problems or table is None or priority is None:
            return None, problems
        self.tables[table] = label
        self.priorities[priority] = label
        if mark is not None:
            self.marks.append((mark, label))
            self._by_mask.setdefault(mark.mask, {}).setdefault(mark.value & mark.mask, (mark, label))
        return Allocation(table, priority, mark), []

    def _auto_mark(self, uuid: str, previous: Optional[Allocation], problems: List[str]) -> Optional[Fwmark]:
        candidates = _auto_marks()
        if previous and previous.fwmark in candidates and not self.mark_clash(previous.fwmark):
            return previous.fwmark
        start = _hash(uuid, "fwmark") % len(candidates)
        for step in range(len(candidates)):
            mark = candidates[(start + step) % len(candidates)]
            if not self.mark_clash(mark):
                return mark
        users = sorted({owner for m, owner in self.foreign.marks if m.mask & AUTO_MARK_MASK})
        users += [owner for _, owner in self.marks]
        problems.append(
            f"no free automatic fwmark left in bits 0x{AUTO_MARK_MASK:08x} (used by "
            f"{', '.join(users[:5]) or 'nobody'}); set nm-policy-routing.fwmark to free bits")
        return None


class _AnyFamily:
    """``priority in`` (family, priority) pairs, whatever the family."""

    def __init__(self, pairs: Container[Tuple[int, int]]) -> None:
        self.pairs = pairs

    def __contains__(self, priority: object) -> bool:
        return (4, priority) in self.pairs or (6, priority) in self.pairs


def _by_mask_items(*indexes: Mapping[int, Dict[int, Tuple[Fwmark, str]]]) -> Iterator[Tuple[int, Dict]]:
    for index in indexes:
        yield from index.items()


def _nft_unsafe(iface: str) -> Optional[str]:
    """Why nft would not read this (kernel-valid) name literally, or None.

    In an ``ifname`` element ``*`` makes a prefix wildcard (refused by a map without the
    interval flag: the whole transaction fails), ``\\`` escapes the next character (``x\\*``
    reads back as ``x*`` and never matches) and a leading ``@`` names a set."""
    if "*" in iface:
        return "contains '*' (nft's wildcard)"
    if "\\" in iface:
        return "contains '\\' (nft's escape character)"
    if iface.startswith("@"):
        return "starts with '@' (nft's set reference)"
    return None


def _families(conn: Connection, policy: Policy) -> List[int]:
    return [f for f in (4, 6) if policy.wants_family(f) and _usable(conn.addresses_of(f))]


def _usable(addresses: Iterable[Address]) -> Tuple[Address, ...]:
    return tuple(a for a in addresses if not a.link_local)


def forward_rule(family: int, iface: str, alloc: Allocation) -> Rule:
    """Just before the mark rule: marked packets that arrive on ``iface`` and are forwarded
    (a port published by DNAT to a container) are routed by the main table, as without
    the policy. Local delivery is decided earlier (the local table), and the reverse-path
    check and locally sent or forwarded replies look up with another iif, so they still
    take the connection's table."""
    assert alloc.fwmark is not None
    return Rule(family, alloc.priority - 1, MAIN_TABLE, alloc.fwmark.value, alloc.fwmark.mask, iif=iface)


def entries_for(conn: Connection, policy: Policy, alloc: Allocation) -> KernelState:
    """The kernel entries one connection's policy asks for, given its allocation."""
    rules: Set[Rule] = set()
    routes: Set[Route] = set()
    marks: Set[Mark] = set()
    sysctls: Set[Sysctl] = set()
    t, p, iface = alloc.table, alloc.priority, conn.iface
    families = _families(conn, policy)
    for family in families:
        addrs = _usable(conn.addresses_of(family))
        primary = addrs[0].ip
        # one route per destination (the kernel keeps one per table and prefix): addresses
        # sharing a prefix (a second address, a VIP, SLAAC + privacy) share its route, whose
        # src is the first of them; the connected routes win over a policy route to the same prefix
        by_dst: Dict[str, Route] = {}
        for addr in addrs:
            if addr.prefixlen < (32 if family == 4 else 128):
                by_dst.setdefault(addr.network, Route(family, t, addr.network, iface, None, addr.ip))
        # without a gateway (never-default VPN, ppp, tun, WireGuard): an on-link default
        by_dst.setdefault(_DEFAULT[family], Route(family, t, _DEFAULT[family], iface,
                                                  real_gateway(conn.gateway_of(family)), primary))
        for extra in policy.routes:
            if extra.family == family:
                by_dst.setdefault(extra.prefix, Route(family, t, extra.prefix, iface, extra.via, primary))
        routes.update(by_dst.values())
        if alloc.fwmark is not None:
            rules.add(Rule(family, p, t, alloc.fwmark.value, alloc.fwmark.mask))
            if "incoming" in policy.match:
                rules.add(forward_rule(family, iface, alloc))
        if "source" in policy.match:
            for addr in addrs:
                rules.add(Rule(family, p, t, src=addr.ip, src_len=32 if family == 4 else 128))
    if alloc.fwmark is not None and families:
        for direction in ("incoming", "outgoing"):
            if direction in policy.match:
                marks.add(Mark(direction, iface, alloc.fwmark.value, alloc.fwmark.mask))
    if 4 in families:
        if alloc.fwmark is not None and policy.src_valid_mark:
            sysctls.add(Sysctl("ipv4", iface, SRC_VALID_MARK, 1))
        if policy.rp_filter != "keep":
            sysctls.add(Sysctl("ipv4", iface, RP_FILTER_KEY, RP_FILTER[policy.rp_filter]))
    state = KernelState(frozenset(rules), frozenset(routes), frozenset(marks), frozenset(sysctls))
    return state | apps.entries(conn, policy, alloc, families)


def plan(
    connections: Sequence[Connection],
    foreign: ForeignUsage = ForeignUsage(),
    previous: Optional[Mapping[str, Allocation]] = None,
    defaults: Optional["Defaults"] = None,
    policy_cache: Optional[Dict[str, Policy]] = None,
) -> Plan:
    """Compute every connection's plan; the union of the ``ok`` ones is the desired state.

    ``policy_cache`` (policy_key -> Policy) skips validating what was validated before;
    policies validated now are added to it."""
    previous = previous or {}
    results: Dict[str, ConnectionPlan] = {}
    enabled: List[Tuple[Connection, Policy]] = []
    seen_ifaces: Dict[str, str] = {}
    seen_apps: Dict[str, str] = {}  # an app's target -> the connection that routes it
    # incumbents (connections that hold an allocation: their policy is applied) come first,
    # so a newcomer never takes what they hold
    for conn in sorted(connections, key=lambda c: (c.uuid not in previous, c.uuid)):
        try:
            policy = _policy(conn, tuple(sorted(defaults.for_connection(conn).items())) if defaults else (),
                             policy_cache)
        except PolicyError as exc:
            results[conn.uuid] = ConnectionPlan(conn, None, errors=tuple(exc.problems), status="invalid")
            continue
        if not policy.enable or conn.iface == "lo":
            results[conn.uuid] = ConnectionPlan(conn, policy, status="disabled")
            continue
        problems = []
        if not _IFNAME.match(conn.iface or ""):
            problems.append(f"interface name {conn.iface!r} is not a valid Linux interface name")
        elif policy.uses_marks and _nft_unsafe(conn.iface):
            problems.append(f"interface name {conn.iface!r} {_nft_unsafe(conn.iface)}, so nftables cannot "
                            "match it literally; rename the interface (connection.interface-name) to use "
                            "a policy on it")
        elif conn.iface in seen_ifaces:
            problems.append(f"interface {conn.iface} already carries the policy of connection "
                            f"{seen_ifaces[conn.iface]}{_KEPT}; one policy per interface")
        problems += [f"{app} is already routed through connection {seen_apps[app.target]}{_KEPT}; list "
                     "it in the nm-policy-routing.apps of one connection only" for app in policy.apps
                     if app.target in seen_apps]
        if problems:
            results[conn.uuid] = _refused(conn, policy, problems)
            continue
        seen_ifaces[conn.iface] = conn.label
        seen_apps.update((app.target, conn.label) for app in policy.apps)
        enabled.append((conn, policy))

    alloc = _Allocator(foreign)
    # incumbents first (never evicted), then explicit values, then autos
    order = sorted(enabled, key=lambda cp: (
        cp[0].uuid not in previous,
        not (cp[1].table or cp[1].priority or cp[1].fwmark),
        cp[0].uuid,
    ))
    for conn, policy in order:
        problems = alloc.explicit(conn.label, policy, previous.get(conn.uuid))
        allocation = None
        if not problems:
            allocation, problems = alloc.take(conn.label, policy, previous.get(conn.uuid), conn.uuid)
        if problems or allocation is None:
            results[conn.uuid] = _refused(conn, policy, problems)
            continue
        state = entries_for(conn, policy, allocation)
        results[conn.uuid] = ConnectionPlan(conn, policy, allocation, state)
    return Plan(tuple(results[c.uuid] for c in sorted(connections, key=lambda c: c.uuid)
                      if c.uuid in results))


def _refused(conn: Connection, policy: Policy, problems: Sequence[str]) -> ConnectionPlan:
    """A conflict: the connection gets no entries, and messages that name it."""
    errors = tuple(f"connection {conn.label} on {conn.iface or '?'} is refused: {p}" for p in problems)
    return ConnectionPlan(conn, policy, errors=errors, status="conflict")


def with_status(cp: ConnectionPlan, status: str, errors: Sequence[str]) -> ConnectionPlan:
    """The same plan, marked failed: its entries are dropped from the desired state."""
    return replace(cp, status=status, errors=tuple(errors), state=KernelState())
