"""Per-application routing: the entries the ``apps`` key asks for, and the cgroup marks' bookkeeping.

Who is listed leaves by the connection with its address as source, for connections
made from now on:

- users: ``ip rule from 0.0.0.0/32 uidrange U-U lookup T``. It matches only the lookup
  made before a socket has a source address (connect(), an unconnected send), so the
  table chooses the source, and a user's established flows (their source already
  chosen) are not moved. IPv6 rules with a source never match a lookup without one;
  there it is ``from ADDR/128 uidrange U-U`` per address of the connection, with the
  kernel's FIB_RULE_FIND_SADDR flag: a lookup without a source tries the table, picks
  the source there and takes the route only if that source is ADDR (the netlink
  adapter sets the flag on IPv6 rules with a uid range);
- units and cgroups: a cgroup BPF program marks the sockets their processes create
  (mark set before connect()), and ``ip rule fwmark V/M lookup T`` routes them;
- both: ``ip rule from ADDR lookup T`` for the connection's addresses, so a flow keeps
  the table once its source is chosen, and its replies pass strict rp_filter (the
  reverse lookup uses our address as source).

The planner part (:func:`entries`) is pure. The reconcile hooks take the kernel adapter:
:func:`settle` leaves out a unit that is not running (no cgroup yet: its mark waits,
reported, not an error), :func:`read` finds our programs, :func:`attach` attaches them
(one the kernel refuses is reported; the connection's other entries stay), and
:func:`remember` records what the next reconcile and ``unit-start`` need.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Sequence, Set, Tuple

from .errors import PolicyRoutingError
from .journal import about
from .model import Allocation, Connection, ConnectionPlan, KernelState, Policy, Rule, SockMark, replace

_UNSPECIFIED = {4: ("0.0.0.0", 32)}
log = logging.getLogger(__name__)


def entries(conn: Connection, policy: Policy, alloc: Allocation, families: Sequence[int]) -> KernelState:
    """The rules and socket marks ``policy.apps`` asks for (the fwmark rule comes with the allocation)."""
    if not policy.apps or not families:
        return KernelState()
    rules: Set[Rule] = set()
    t, p = alloc.table, alloc.priority
    for family in families:
        full = 32 if family == 4 else 128
        for addr in conn.addresses_of(family):
            if not addr.link_local:
                rules.add(Rule(family, p, t, src=addr.ip, src_len=full))
        sources = [_UNSPECIFIED[4]] if family == 4 else \
            [(a.ip, full) for a in conn.addresses_of(6) if not a.link_local]
        for app in policy.apps:
            if app.kind == "uid":
                rules |= {Rule(family, p, t, src=src, src_len=length, uid_start=app.uid, uid_end=app.uid)
                          for src, length in sources}
    sockmarks: Set[SockMark] = set()
    if alloc.fwmark is not None:
        sockmarks = {SockMark(a.target, alloc.fwmark.value, alloc.fwmark.mask) for a in policy.apps
                     if a.needs_cgroup}
    return KernelState(rules=frozenset(rules), sockmarks=frozenset(sockmarks))


def targets(plans: Iterable[ConnectionPlan]) -> Set[str]:
    return {s.target for cp in plans for s in cp.state.sockmarks}


def read(kernel: object, wanted: Iterable[str], record: Dict) -> KernelState:
    """Our socket marks on these targets and those recorded (a kernel without cgroup support holds none)."""
    reader = getattr(kernel, "read_sockmarks", None)
    if reader is None:
        return KernelState()
    targets = set(wanted) | set(record.get("sockmarks", []))
    known = {int(i): (int(v), int(m)) for i, (v, m) in record.get("sockmark_ids", {}).items()}
    return KernelState(sockmarks=frozenset(reader(targets, known)))


def remember(kernel: object, record: Dict, target: KernelState, planned: Sequence[ConnectionPlan],
             final: Sequence[ConnectionPlan], notes: Dict[str, List[str]]) -> None:
    """What the next reconcile needs to find our socket programs (their targets and program ids), and
    the mark of each unit listed by an applied policy, running or not (for ``unit-start``)."""
    record["sockmarks"] = sorted({s.target for s in target.sockmarks})
    live = getattr(kernel, "live_ids", {})
    record["sockmark_ids"] = {str(i): [v, m] for i, (v, m) in sorted(live.items())}
    applied = {cp.connection.uuid for cp in final if cp.status == "ok"}
    record["unit_marks"] = {s.target: [s.value, s.mask] for cp in planned if cp.connection.uuid in applied
                            for s in sorted(cp.state.sockmarks) if s.target.startswith("unit:")}
    record["app_notes"] = notes


def attach(kernel: object, plans: List[ConnectionPlan], before: KernelState, notes: Dict[str, List[str]],
           result: object) -> Tuple[List[ConnectionPlan], KernelState]:
    """Attach the socket programs the applied plans ask for (after their rules: a marked socket finds
    its table). One that the kernel refuses is reported in ``notes`` and left out of that plan; the
    connection's other entries stay (its users, its replies)."""
    out, attached = [], set()
    for cp in plans:
        failed = set()
        for entry in sorted(cp.state.sockmarks - before.sockmarks) if cp.status == "ok" else ():
            try:
                kernel.attach_sockmark(entry)  # type: ignore[attr-defined]
            except PolicyRoutingError as exc:
                failed.add(entry)
                note = f"connection {cp.connection.label} on {cp.connection.iface}: {entry.target} is not routed: {exc}"
                notes.setdefault(cp.connection.uuid, []).append(note)
                log.error("%s", note, extra=about(cp.connection))
                continue
            result.change(f"attach {entry}", entry)  # type: ignore[attr-defined]
            attached.add(entry)
        if failed:
            cp = replace(cp, state=replace(cp.state, sockmarks=cp.state.sockmarks - failed))
        out.append(cp)
    return out, KernelState(sockmarks=frozenset(attached))


def settle(kernel: object, plans: Sequence[ConnectionPlan]) -> Tuple[List[ConnectionPlan], Dict[str, List[str]]]:
    """Plans without the socket marks whose cgroup does not exist now, and a note for each."""
    path_of = getattr(kernel, "cgroup_path", None)
    out: List[ConnectionPlan] = []
    notes: Dict[str, List[str]] = {}
    for cp in plans:
        waiting = {s for s in cp.state.sockmarks if path_of is None or path_of(s.target) is None}
        if waiting:
            notes[cp.connection.uuid] = [_waiting_note(cp.connection, s, path_of is None) for s in sorted(waiting)]
            for note in notes[cp.connection.uuid]:
                log.debug("%s", note, extra=about(cp.connection))
            cp = replace(cp, state=replace(cp.state, sockmarks=cp.state.sockmarks - waiting))
        out.append(cp)
    return out, notes


def _waiting_note(conn: Connection, mark: SockMark, unsupported: bool) -> str:
    if unsupported:
        return (f"connection {conn.label} on {conn.iface}: {mark.target} is not routed: this machine has no "
                "cgroup2 hierarchy (units and cgroups need cgroup v2; users work)")
    if mark.target.startswith("unit:"):
        return (f"connection {conn.label} on {conn.iface}: {mark.target} waits: the unit is not running; its "
                "sockets are marked when it starts (the daemon follows systemd; without the daemon, at the next "
                "'nm-policy-routing apply')")
    return (f"connection {conn.label} on {conn.iface}: {mark.target} waits: the cgroup does not exist; its sockets "
            "are marked when it appears (the daemon watches for it; without the daemon, at the next "
            "'nm-policy-routing apply')")
