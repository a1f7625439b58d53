"""The reconcile loop: desired vs current -> apply in a safe order -> verify -> roll back.

Every door (dispatcher hook, daemon, CLI) ends here. One lock serializes callers;
applying the same state twice changes nothing. A connection whose entries the
kernel refuses is rolled back alone and reported; the others still apply.

Order of changes: sysctls, routes, rules, then the nft marking (so no packet is
marked before its table exists); removal in reverse: marking, rules, routes,
sysctls restored to the value recorded before we first changed them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Protocol, Sequence

from .errors import KernelError, PolicyRoutingError, VerifyError
from .faults import fault_point
from .model import Connection, ConnectionPlan, ForeignUsage, Fwmark, KernelState, Mark, Route, Rule, Sysctl
from .planner import plan, with_status
from .record import Record, locked, state_dir

if TYPE_CHECKING:
    from .config import Defaults

log = logging.getLogger(__name__)

#: validated policies of connections no longer active that the record keeps
KEEP_UNUSED_POLICIES = 32


class Kernel(Protocol):
    nft_exists: bool
    nft_intact: bool

    def read(self, sysctl_slots: Iterable[str]) -> KernelState: ...
    def read_sysctl(self, family: str, iface: str, key: str) -> Optional[int]: ...
    def foreign(self) -> ForeignUsage: ...
    def write_sysctl(self, entry: Sysctl) -> None: ...
    def add_route(self, route: Route) -> None: ...
    def del_route(self, route: Route) -> None: ...
    def add_rule(self, rule: Rule) -> None: ...
    def del_rule(self, rule: Rule) -> None: ...
    def set_marks(self, marks: Iterable[Mark]) -> None: ...
    def flush_conntrack(self, mark: Fwmark) -> None: ...
    def close(self) -> None: ...


def slot(entry: Sysctl) -> str:
    return "/".join(entry.slot)


@dataclass
class Result:
    """What one reconcile did and how each connection ended."""

    plans: List[ConnectionPlan] = field(default_factory=list)
    changes: List[str] = field(default_factory=list)
    #: with dry_run: the equivalent shell commands, in order
    commands: List[str] = field(default_factory=list)

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


def _route_key(route: Route) -> tuple:
    return (route.family, route.table, route.dst)


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

        return DryRunKernel() if self.dry_run else LiveKernel()

    # ---- doors ---------------------------------------------------------

    def reconcile(self, connections: Optional[Sequence[Connection]] = None) -> Result:
        """Make the kernel hold exactly the policies of ``connections`` (all active ones).

        ``None`` re-applies the connections already recorded (repair drift).
        """
        def update(known: Dict[str, Connection]) -> Dict[str, Connection]:
            return known if connections is None else {c.uuid: c for c in connections}
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
            finally:
                kernel.close()
        the_plan = plan(list(record.connections().values()), foreign, record.allocations(), self.defaults())
        drift: Dict[str, List[str]] = {}
        wanted = KernelState()
        for cp in the_plan.connections:
            wanted = wanted | cp.state
            missing = cp.state - current
            lines = [f"missing: {entry}" for entry in missing.entries()]
            if cp.state.marks and not nft_intact:
                lines.append("changed: our nft table inet nm_policy_routing is not as written")
            if lines:
                drift[cp.connection.uuid] = lines
        stray = [f"not wanted by any policy: {e}" for e in (current - wanted).entries()
                 if not isinstance(e, Sysctl)]
        return Inspection(list(the_plan.connections), current, drift, stray, foreign)

    def known(self) -> Dict[str, Connection]:
        return Record.load(self.directory).connections()

    def record(self) -> Record:
        return Record.load(self.directory)

    # ---- the loop ------------------------------------------------------

    def _run(self, update: Callable[[Dict[str, Connection]], Dict[str, Connection]]) -> Result:
        with locked(self.directory):
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
        originals = record.sysctl_originals()
        before = kernel.read(originals)
        cache = record.policies()
        the_plan = plan(list(conns.values()), kernel.foreign(), record.allocations(), self.defaults(), cache)
        used = {cp.policy for cp in the_plan.connections if cp.policy is not None}
        # the policies in use, and a few of connections gone (they come back: no pydantic then)
        spare = [k for k, p in cache.items() if p not in used][-KEEP_UNUSED_POLICIES:]
        record.set_policies({k: p for k, p in cache.items() if p in used or k in spare})
        record.set_connections(conns)
        record.set_allocations({**{u: a for u, a in record.allocations().items() if u in conns},
                                **the_plan.allocations})
        self._record_originals(kernel, record, the_plan.desired.sysctls)
        record.save()  # allocations and originals first: a crash mid-apply restarts from here
        result = Result()
        plans: List[ConnectionPlan] = []
        added: Dict[str, KernelState] = {}
        current = before
        for cp in the_plan.connections:
            if cp.status != "ok" or not cp.state:
                plans.append(cp)
                continue
            todo = cp.state - current
            try:
                self._add(kernel, record, todo, result)
            except PolicyRoutingError as exc:
                self._undo_adds(kernel, record, todo, before, result)
                log.error("%s", _failed(cp, exc))
                plans.append(with_status(cp, "error", [_failed(cp, exc)]))
                continue
            added[cp.connection.uuid] = todo
            if todo:  # (a union copies every set: only when there is something to add)
                current = current | todo
            plans.append(cp)
        target = KernelState.union(cp.state for cp in plans if cp.status == "ok")
        try:
            self._set_marks(kernel, before, target, result)
        except PolicyRoutingError as exc:
            for todo in added.values():
                self._undo_adds(kernel, record, todo, before, result)
            plans = [with_status(cp, "error", [_failed(cp, exc)]) if cp.status == "ok" and cp.state - before
                     else cp for cp in plans]  # a policy already in place stays applied
            target = before  # keep what was there (the other policies keep working); add nothing
        self._remove_stale(kernel, record, current, target, result)
        try:
            if not self.dry_run and result.changes:  # without a change, the read above verified it
                self._verify(kernel, record, target)
        except VerifyError:
            self._rollback(kernel, record, before)
            record.save()
            raise
        result.plans = plans
        self._record_outcomes(record, plans)
        record.save()
        return result

    def _record_originals(self, kernel: Kernel, record: Record, wanted: Iterable[Sysctl]) -> None:
        """Remember each sysctl's value before we first change it (the caller saves the record
        before any change, so the originals survive a crash right after the writes)."""
        originals = record.data["sysctls"]
        for entry in wanted:
            if slot(entry) not in originals:
                value = kernel.read_sysctl(*entry.slot)
                if value is not None:
                    originals[slot(entry)] = value

    def _add(self, kernel: Kernel, record: Record, todo: KernelState, result: Result) -> None:
        originals = record.data["sysctls"]
        for entry in sorted(todo.sysctls):
            if slot(entry) not in originals:
                raise KernelError(f"cannot set {entry.name}: interface {entry.iface} does not exist")
            if kernel.read_sysctl(*entry.slot) == entry.value:
                continue
            fault_point("sysctl")
            kernel.write_sysctl(entry)
            result.changes.append(f"set {entry}")
        for route in sorted(todo.routes):
            fault_point("route")
            kernel.add_route(route)
            result.changes.append(f"add {route}")
        for rule in sorted(todo.rules):
            fault_point("rule")
            kernel.add_rule(rule)
            result.changes.append(f"add {rule}")

    def _undo_adds(self, kernel: Kernel, record: Record, todo: KernelState, before: KernelState,
                   result: Result) -> None:
        """Best effort: take back a connection's adds that were not there before."""
        for rule in sorted(todo.rules - before.rules):
            _quietly(kernel.del_rule, rule)
        kept = {_route_key(r) for r in before.routes}
        for route in sorted(todo.routes - before.routes):
            if _route_key(route) not in kept:
                _quietly(kernel.del_route, route)
        prior = {slot(s): s.value for s in before.sysctls}
        for entry in sorted(todo.sysctls):
            key = slot(entry)
            value = prior.get(key, record.data["sysctls"].get(key))
            if value is not None:
                _quietly(kernel.write_sysctl, Sysctl(entry.family, entry.iface, entry.key, int(value)))
            if key not in prior:
                record.data["sysctls"].pop(key, None)
        result.changes.append("rolled back a connection's partial changes")

    def _set_marks(self, kernel: Kernel, before: KernelState, target: KernelState, result: Result) -> None:
        if target.marks == before.marks and kernel.nft_intact:
            return
        fault_point("nft")
        kernel.set_marks(target.marks)
        result.changes.append(f"nft table: {len(target.marks)} marking entries")
        gone = {Fwmark(m.value, m.mask) for m in before.marks} - {Fwmark(m.value, m.mask) for m in target.marks}
        for mark in sorted(gone, key=lambda f: (f.mask, f.value)):
            fault_point("conntrack")
            kernel.flush_conntrack(mark)  # its flows re-route at once; no other entry is touched
            result.changes.append(f"conntrack: deleted the flows marked {mark}")

    def _remove_stale(self, kernel: Kernel, record: Record, current: KernelState, target: KernelState,
                      result: Result) -> None:
        stale = current - target
        for rule in sorted(stale.rules):
            fault_point("rule")
            kernel.del_rule(rule)
            result.changes.append(f"delete {rule}")
        replaced = {_route_key(r) for r in target.routes}
        for route in sorted(stale.routes):
            if _route_key(route) not in replaced:  # 'replace' already overwrote it
                fault_point("route")
                kernel.del_route(route)
                result.changes.append(f"delete {route}")
        wanted = {slot(s) for s in target.sysctls}
        for key, original in sorted(record.data["sysctls"].items()):
            if key in wanted:
                continue
            family, iface, name = key.split("/")
            if kernel.read_sysctl(family, iface, name) is not None:
                fault_point("sysctl")
                kernel.write_sysctl(Sysctl(family, iface, name, int(original)))
                result.changes.append(f"restore net.{family}.conf.{iface}.{name}={original}")
            del record.data["sysctls"][key]

    def _rollback(self, kernel: Kernel, record: Record, before: KernelState) -> None:
        """Put back the state found at the start of this reconcile (best effort, logged)."""
        log.error("verification failed: rolling back to the state before this change")
        scratch = Result()
        try:
            now = kernel.read(record.sysctl_originals())
            self._add(kernel, record, before - now, scratch)
            self._set_marks(kernel, now, before, scratch)
            self._remove_stale(kernel, record, now, before, scratch)
        except PolicyRoutingError as exc:
            log.error("rollback incomplete: %s; run 'nm-policy-routing apply' to converge", exc)

    def _verify(self, kernel: Kernel, record: Record, target: KernelState) -> None:
        after = kernel.read(record.sysctl_originals())
        problems = []
        for kind in ("rules", "routes", "marks"):
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


def _failed(cp: ConnectionPlan, exc: Exception) -> str:
    return (f"connection {cp.connection.label} on {cp.connection.iface}: {exc}; nothing of its policy "
            "was left installed. Check the interface and its addresses, then run "
            "'nm-policy-routing apply'.")


def _quietly(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except PolicyRoutingError as exc:
        log.warning("rollback step failed: %s", exc)
