"""The reconcile loop: desired vs current -> apply in a safe order -> verify -> roll back.

Every door (dispatcher hook, daemon, CLI) ends here. One lock serializes callers;
applying the same state twice changes nothing. A connection whose entries the
kernel refuses is rolled back alone and reported; the others still apply.

Order of changes: sysctls, routes, rules, then the nft marking (so no packet is
marked before its table exists); removal in reverse: marking, rules, routes,
sysctls restored to the value recorded before we first changed them.
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from typing import (TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Protocol,
                    Sequence, Set, Tuple, Union)

from . import apps
from .caveats import caveats
from .errors import PolicyRoutingError, VerifyError
from .faults import fault_point
from .journal import about, named
from .model import (Connection, ConnectionPlan, ForeignUsage, Fwmark, KernelState, Mark, Route, Rule, Sysctl,
                    dataclass, field, replace)
from .planner import plan, with_status
from .record import Record, allocations_from_kernel, locked, state_dir
from .rollback import roll_back, route_key, slot, undo_adds
from .story import owners_of
from .writes import add_many, delete_many

if TYPE_CHECKING:
    from .config import Defaults

log = logging.getLogger(__name__)

#: validated policies of connections no longer active that the record keeps
KEEP_UNUSED_POLICIES = 32
#: reads the active connections (None: unknown, re-apply the recorded ones); see Engine.reconcile
Snapshot = Callable[[], Optional[Sequence[Connection]]]


class Kernel(Protocol):
    nft_exists: bool
    nft_intact: bool

    def read(self, sysctl_slots: Iterable[str]) -> KernelState: ...
    def read_sysctl(self, family: str, iface: str, key: str) -> Optional[int]: ...
    def unusable_addresses(self, iface: Optional[str] = None) -> Set[str]: ...
    def foreign(self) -> ForeignUsage: ...
    def write_sysctl(self, entry: Sysctl) -> None: ...
    def add_route(self, route: Route) -> None: ...
    def del_route(self, route: Route) -> None: ...
    def add_rule(self, rule: Rule) -> None: ...
    def del_rule(self, rule: Rule) -> None: ...
    def set_marks(self, marks: Iterable[Mark]) -> None: ...
    def flush_conntrack(self, mark: Fwmark) -> None: ...
    def close(self) -> None: ...


@dataclass
class Result:
    """What one reconcile did and how each connection ended."""

    plans: List[ConnectionPlan] = field(default_factory=list)
    changes: List[str] = field(default_factory=list)
    #: with dry_run: the equivalent shell commands, in order
    commands: List[str] = field(default_factory=list)
    #: uuid -> addresses left out because the kernel does not take them as a source yet
    waiting: Dict[str, List[str]] = field(default_factory=dict)
    #: each change with the connection it belongs to (None: shared by all, e.g. the nft table rewritten)
    attributed: List[Tuple[Optional[Connection], str]] = field(default_factory=list)
    owner: Callable[[Any], Optional[Connection]] = field(default=lambda entry: None, repr=False)

    def change(self, text: str, entry: Any = None) -> None:
        """Record a change made to the kernel; ``entry`` tells whose it is."""
        self.changes.append(text)
        self.attributed.append((self.owner(entry) if entry is not None else None, text))

    @property
    def errors(self) -> Dict[str, List[str]]:
        return {cp.connection.uuid: list(cp.errors) for cp in self.plans if cp.errors}

    def plan_of(self, uuid: str) -> Optional[ConnectionPlan]:
        return next((cp for cp in self.plans if cp.connection.uuid == uuid), None)


@dataclass
class Inspection:
    """What the kernel holds against what the recorded connections' policies ask for."""

    plans: List[ConnectionPlan]
    current: KernelState
    drift: Dict[str, List[str]]
    stray: List[str]
    foreign: ForeignUsage
    #: per connection: settings in place that cannot take effect, and why
    caveats: Dict[str, List[str]] = field(default_factory=dict)


class Engine:
    """The public API: ``reconcile`` a full set of connections, ``ensure`` or ``remove`` one."""

    def __init__(
        self,
        directory: Optional[str] = None,
        defaults: Optional["Defaults"] = None,
        kernel_factory: Optional[Callable[[], Kernel]] = None,
        dry_run: bool = False,
    ) -> None:
        self.directory = state_dir(directory)
        self.dry_run = dry_run
        self._defaults = defaults
        self._kernel_factory = kernel_factory
        #: the apps targets (``unit:NAME``, ``cgroup:/PATH``) that the last full reconcile left
        #: waiting for their cgroup (the daemon re-syncs when systemd says such a unit started)
        self.waiting_apps: FrozenSet[str] = frozenset()

    def keep_kernel(self, factory: Callable[[], Kernel]) -> None:
        """Use ``factory`` for every call's kernel (the daemon keeps one open across events)."""
        self._kernel_factory = factory

    def defaults(self) -> "Defaults":
        """The global defaults file, read at each reconcile (edits apply at the next one)."""
        if self._defaults is not None:
            return self._defaults
        from .config import load

        loaded = load()
        for problem in loaded.problems:
            log.error("%s (the defaults file is ignored until fixed)", problem)
        return loaded if not loaded.problems else type(loaded)(loaded.source)

    def _kernel(self) -> Kernel:
        if self._kernel_factory:
            return self._kernel_factory()
        from .adapters.kernel import DryRunKernel, LiveKernel

        return DryRunKernel() if self.dry_run else LiveKernel(self.directory)

    # ---- doors ---------------------------------------------------------

    def reconcile(self, connections: Union[Snapshot, Optional[Sequence[Connection]]] = None) -> Result:
        """Make the kernel hold exactly the policies of ``connections`` (all active ones).

        ``None`` re-applies the connections already recorded (repair drift). A callable is
        called with the lock held and its snapshot used the same way: no other door's change
        (the hook's ``up`` or ``down``) can land between the read and this reconcile.
        """
        def update(known: Dict[str, Connection]) -> Dict[str, Connection]:
            conns = connections() if callable(connections) else connections
            return known if conns is None else {c.uuid: c for c in conns}
        return self._run(update)

    def ensure(self, conn: Connection) -> Result:
        """One connection is active with these facts; the others stay as recorded."""
        return self._run(lambda known: {**known, conn.uuid: conn})

    def remove(self, uuid: str) -> Result:
        """One connection is gone: remove exactly its policy."""
        return self._run(lambda known: {u: c for u, c in known.items() if u != uuid})

    def flush(self) -> Result:
        """Remove everything of ours from the kernel and forget every connection."""
        return self._run(lambda known: {})

    def inspect(self) -> Inspection:
        """Read-only: per connection, what is missing or changed in the kernel (drift)."""
        with locked(self.directory):
            record = Record.load(self.directory)
            kernel = self._kernel()
            try:
                current = kernel.read(record.sysctl_originals())
                foreign = kernel.foreign()
                nft_intact = kernel.nft_intact
                rp_all = kernel.read_sysctl("ipv4", "all", "rp_filter")
                # foreign tables are looked up lazily: plan while the kernel is open
                the_plan = plan(list(record.connections().values()), foreign, record.allocations(),
                                self.defaults())
                settled, _ = apps.settle(kernel, the_plan.connections)
                current = current | apps.read(kernel, apps.targets(settled), record.data)
            finally:
                kernel.close()
        drift: Dict[str, List[str]] = {}
        wanted = KernelState()
        for cp in settled:
            wanted = wanted | cp.state
            missing = cp.state - current
            lines = [f"missing: {entry}" for entry in missing.entries()]
            if cp.state.marks and not nft_intact:
                lines.append("changed: our nft table inet nm_policy_routing is not as written")
            if lines:
                drift[cp.connection.uuid] = lines
        stray = [f"not wanted by any policy: {e}" for e in (current - wanted).entries()
                 if not isinstance(e, Sysctl)]
        notes = {cp.connection.uuid: caveats(cp, foreign, rp_all) for cp in settled}
        return Inspection(list(settled), current, drift, stray, foreign,
                          {uuid: lines for uuid, lines in notes.items() if lines})

    def known(self) -> Dict[str, Connection]:
        return Record.load(self.directory).connections()

    def record(self) -> Record:
        return Record.load(self.directory)

    # ---- the loop ------------------------------------------------------

    def _run(self, update: Callable[[Dict[str, Connection]], Dict[str, Connection]]) -> Result:
        with locked(self.directory), _collector_paused():
            record = Record.load(self.directory)
            record.readonly = self.dry_run
            conns = update(record.connections())
            kernel = self._kernel()
            try:
                result = self._reconcile(kernel, record, conns)
                result.commands = list(getattr(kernel, "commands", []))
                return result
            finally:
                kernel.close()

    def _reconcile(self, kernel: Kernel, record: Record, conns: Dict[str, Connection]) -> Result:
        known_before = record.connections()
        originals = record.sysctl_originals()
        before = kernel.read(originals)
        cache = record.policies()
        previous = record.allocations()
        if record.damaged:  # rebuilt: keep the tables and marks our tagged entries show
            by_iface = allocations_from_kernel(before)
            previous = {**{c.uuid: by_iface[c.iface] for c in conns.values() if c.iface in by_iface}, **previous}
        result = Result()
        held = self._held_back(kernel, conns, result)
        planned = [replace(c, addresses=tuple(a for a in c.addresses if a.ip not in held[c.uuid]))
                   if c.uuid in held else c for c in conns.values()]
        foreign = kernel.foreign()
        the_plan = plan(planned, foreign, previous, self.defaults(), cache)
        settled, app_notes = apps.settle(kernel, the_plan.connections)  # a unit not running: nothing to mark
        if not self.dry_run:
            self.waiting_apps = frozenset(apps.targets(the_plan.connections) - apps.targets(settled))
        before = before | apps.read(kernel, apps.targets(settled), record.data)
        result.owner = owners_of(known_before, previous, the_plan.connections)
        used = {cp.policy for cp in the_plan.connections if cp.policy is not None}
        # the policies in use, and a few of connections gone (they come back: no pydantic then)
        spare = [k for k, p in cache.items() if p not in used][-KEEP_UNUSED_POLICIES:]
        record.set_policies({k: p for k, p in cache.items() if p in used or k in spare})
        record.set_connections(conns)
        record.set_allocations({**{u: a for u, a in record.allocations().items() if u in conns},
                                **the_plan.allocations})
        self._record_originals(kernel, record, the_plan.desired.sysctls)
        record.save()  # allocations and originals first: a crash mid-apply restarts from here
        plans, added = self._install(kernel, record, settled, before, result)
        current = KernelState.union([before, *added.values()])
        plans, attached = apps.attach(kernel, plans, before, app_notes, result)  # after the rules
        current = current | attached
        target = KernelState.union(cp.state for cp in plans if cp.status == "ok")
        try:
            self._set_marks(kernel, before, target, result)
        except PolicyRoutingError as exc:
            for todo in added.values():
                undo_adds(kernel, record, todo, before, result)
            plans = [with_status(cp, "error", [_failed(cp, exc)]) if cp.status == "ok" and cp.state - before
                     else cp for cp in plans]  # a policy already in place stays applied
            target = before  # keep what was there (the other policies keep working); add nothing
        restored: List[str] = []
        try:
            self._remove_stale(kernel, record, current, target, result, restored)
            if not self.dry_run:
                fault_point("verify")
                if result.changes:  # without a change, the read above verified it
                    self._verify(kernel, record, target)
        except PolicyRoutingError:
            roll_back(kernel, record, before)
            record.save()
            raise
        for key in restored:  # verified: the originals of what we restored are no longer needed
            record.data["sysctls"].pop(key, None)
        result.plans = plans
        self._log_caveats(kernel, [cp for cp in plans if added.get(cp.connection.uuid)], foreign)
        self._record_outcomes(record, plans)
        apps.remember(kernel, record.data, target, the_plan.connections, plans, app_notes)
        record.save()
        return result

    @staticmethod
    def _held_back(kernel: Kernel, conns: Dict[str, Connection], result: Result) -> Dict[str, List[str]]:
        """uuid -> its addresses the kernel will not take as a source yet (tentative: duplicate
        address detection runs) or at all (DAD failed). They are planned without, and come in
        by a later reconcile (the daemon on the address's notification; the hook's settle)."""
        if not any(c.addresses for c in conns.values()):
            return {}
        reader = getattr(kernel, "unusable_addresses", None)  # a kernel model without it has none
        one = next(iter(conns.values())).iface if len(conns) == 1 else None  # one: its interface's alone
        unusable = (reader(one) if one else reader()) if reader else set()
        for conn in conns.values():
            waiting = [a.ip for a in conn.addresses if a.ip in unusable and not a.link_local]  # unplanned
            if waiting:
                result.waiting[conn.uuid] = waiting
                log.debug("%s: address %s is not usable yet (duplicate address detection); the policy for "
                          "it follows when it is", named(conn), ", ".join(waiting), extra=about(conn))
        return result.waiting

    def _record_originals(self, kernel: Kernel, record: Record, wanted: Iterable[Sysctl]) -> None:
        """Remember each sysctl's value before we first change it (the caller saves the record
        before any change, so the originals survive a crash right after the writes)."""
        originals = record.data["sysctls"]
        for entry in wanted:
            if slot(entry) not in originals:
                value = kernel.read_sysctl(*entry.slot)
                if value is not None:
                    originals[slot(entry)] = value

    def _install(self, kernel: Kernel, record: Record, settled: Sequence[ConnectionPlan], before: KernelState,
                 result: Result) -> Tuple[List[ConnectionPlan], Dict[str, KernelState]]:
        """Add what the applicable plans miss, per address family, every connection's entries at once
        (writes.py). A connection whose entry the kernel refuses has that family's part taken
        back alone (one family's failure never takes the other down); the others stay. The planner
        gives each connection its own entries (table, priority, interface), so no two share one."""
        ready = [cp for cp in settled if cp.status == "ok" and cp.state]
        added: Dict[str, KernelState] = {}
        failures: Dict[str, Dict[int, str]] = {}
        for family in (4, 6):
            todo = {cp.connection.uuid: _family_part(cp.state, family) - before for cp in ready}
            errors = add_many(kernel, record, todo, result)
            for uuid, part in todo.items():
                if uuid in errors:
                    undo_adds(kernel, record, part, before, result)
                    failures.setdefault(uuid, {})[family] = f"IPv{family}: {errors[uuid]}"
                elif part:
                    added[uuid] = added[uuid] | part if uuid in added else part
        plans: List[ConnectionPlan] = []
        for cp in settled:
            failed = failures.get(cp.connection.uuid)
            if failed:
                kept = KernelState.union(_family_part(cp.state, f) for f in (4, 6) if f not in failed)
                if not (kept.rules or kept.routes):  # the caller logs the error (story.py)
                    cp = with_status(cp, "error", [_failed(cp, "; ".join(failed.values()))])
                else:
                    cp = replace(cp, state=kept | KernelState(marks=cp.state.marks),
                                 errors=(_failed_family(cp, list(failed.values())),))
            plans.append(cp)
        return plans, added

    def _add(self, kernel: Kernel, record: Record, todo: KernelState, result: Result) -> None:
        """Add ``todo`` (one connection's entries); the first one the kernel refuses is raised."""
        error = add_many(kernel, record, {None: todo}, result).get(None)
        if error is not None:
            raise error

    def _set_marks(self, kernel: Kernel, before: KernelState, target: KernelState, result: Result,
                   write: Optional[Callable[[Iterable[Mark]], None]] = None) -> None:
        """Make the marks ``target`` holds; ``write`` (one connection's: its marks only) instead of
        the whole table's."""
        if target.marks == before.marks and kernel.nft_intact:
            return
        fault_point("nft")
        (write or kernel.set_marks)(target.marks)
        result.changes.append(f"nft table: {len(target.marks)} marking entries" if write is None
                              else f"nft table: {len(target.marks)} marking entries of the connection")
        added, removed = sorted(target.marks - before.marks), sorted(before.marks - target.marks)
        for mark_entry in added:
            result.attributed.append((result.owner(mark_entry), f"add {mark_entry}"))
        for mark_entry in removed:
            result.attributed.append((result.owner(mark_entry), f"delete {mark_entry}"))
        if not added and not removed:
            result.attributed.append((None, f"nft table rewritten: {len(target.marks)} marking entries"))
        gone = {Fwmark(m.value, m.mask) for m in before.marks} - {Fwmark(m.value, m.mask) for m in target.marks}
        for mark in sorted(gone, key=lambda f: (f.mask, f.value)):
            fault_point("conntrack")
            kernel.flush_conntrack(mark)  # its flows re-route at once; no other entry is touched
            result.change(f"conntrack: deleted the flows marked {mark}", mark)

    def _remove_stale(self, kernel: Kernel, record: Record, current: KernelState, target: KernelState,
                      result: Result, restored: List[str], slots: Optional[Iterable[str]] = None) -> None:
        """Delete what is no longer wanted; sysctls go back to their originals, which stay in the
        record (listed in ``restored``) until the result is verified. ``slots``: the recorded
        originals to consider (one connection's; default all)."""
        stale = current - target
        for entry in sorted(stale.sockmarks):  # before the rules: no socket is marked for a gone table
            kernel.detach_sockmark(entry)  # type: ignore[attr-defined]
            result.change(f"detach {entry}", entry)
        replaced = {route_key(r) for r in target.routes}  # 'replace' already overwrote those routes
        delete_many(kernel, "rules", sorted(stale.rules), result)  # one batch each: the rules first
        delete_many(kernel, "routes", [r for r in sorted(stale.routes) if route_key(r) not in replaced], result)
        wanted = {slot(s) for s in target.sysctls}
        originals = record.data["sysctls"]
        for key in sorted(originals if slots is None else set(slots) & originals.keys()):
            original = originals[key]
            if key in wanted:
                continue
            family, iface, name = key.split("/")
            value = kernel.read_sysctl(family, iface, name)
            if value is not None and value != int(original):
                fault_point("sysctl")
                kernel.write_sysctl(Sysctl(family, iface, name, int(original)))
                result.change(f"restore net.{family}.conf.{iface}.{name}={original}",
                              Sysctl(family, iface, name, int(original)))
            restored.append(key)

    def _verify(self, kernel: Kernel, record: Record, target: KernelState,
                read: Optional[Callable[[], KernelState]] = None) -> None:
        """Read back (everything, or what ``read`` reads: one connection's) and compare to ``target``."""
        after = read() if read is not None else kernel.read(record.sysctl_originals())
        problems = []
        for kind in ("rules", "routes", "marks", "sockmarks"):
            want, have = getattr(target, kind), getattr(after, kind)
            problems += [f"missing {e}" for e in sorted(want - have)]
            problems += [f"unexpected {e}" for e in sorted(have - want)]
        problems += [f"not set: {e}" for e in sorted(target.sysctls - after.sysctls)]
        if not kernel.nft_intact:
            problems.append("our nft table is not as written")
        if problems:
            record.save()
            raise VerifyError(
                "after applying, the kernel does not hold the planned state: " + "; ".join(problems[:10])
                + ". Something else changed it meanwhile; run 'nm-policy-routing apply' again, and "
                "'nm-policy-routing status' to see what differs."
            )

    def _log_caveats(self, kernel: Kernel, applied: List[ConnectionPlan], foreign: ForeignUsage) -> None:
        """At apply: what was just installed but cannot take effect here (status shows it too)."""
        rp_all = kernel.read_sysctl("ipv4", "all", "rp_filter") if applied else None
        for cp in applied:
            for line in caveats(cp, foreign, rp_all):
                log.warning("%s: %s", named(cp.connection), line, extra=about(cp.connection))

    def _record_outcomes(self, record: Record, plans: List[ConnectionPlan]) -> None:
        outcomes = {}
        for cp in plans:
            outcomes[cp.connection.uuid] = {
                "id": cp.connection.id,
                "iface": cp.connection.iface,
                "status": cp.status,
                "errors": list(cp.errors),
            }
        record.data["outcomes"] = {}
        for uuid, outcome in outcomes.items():
            record.set_outcome(uuid, outcome)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection during one reconcile: it allocates some 10^5 short-lived objects
    (entries, plans, messages) that reference counting frees, and each collection they trigger walks
    the whole heap (the daemon's imports: ~35 000 objects), ~30 ms at 256 connections here."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _family_part(state: KernelState, family: int) -> KernelState:
    """The entries of one address family (the IPv4 sysctls with IPv4); marks are shared."""
    name = "ipv4" if family == 4 else "ipv6"
    return KernelState(frozenset(r for r in state.rules if r.family == family),
                       frozenset(r for r in state.routes if r.family == family),
                       frozenset(), frozenset(s for s in state.sysctls if s.family == name))


def _failed_family(cp: ConnectionPlan, failures: List[str]) -> str:
    return (f"connection {cp.connection.label} on {cp.connection.iface}: part of its policy was not "
            f"installed ({'; '.join(failures)}); the other address family's part is. Check the interface "
            "and its addresses, then run 'nm-policy-routing apply'.")


def _failed(cp: ConnectionPlan, exc: object) -> str:
    return (f"connection {cp.connection.label} on {cp.connection.iface}: {exc}; nothing of its policy "
            "was left installed. Check the interface and its addresses, then run "
            "'nm-policy-routing apply'.")
