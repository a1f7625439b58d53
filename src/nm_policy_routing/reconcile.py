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
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Set

from .errors import KernelError, PolicyRoutingError, VerifyError
from .model import Connection, ConnectionPlan, ForeignUsage, KernelState, Mark, Route, Rule, Sysctl
from .planner import Plan, plan, with_status
from .record import Record, locked, state_dir

log = logging.getLogger(__name__)


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
    def close(self) -> None: ...


def slot(entry: Sysctl) -> str:
    return "/".join(entry.slot)


@dataclass
class Result:
    """What one reconcile did and how each connection ended."""

    plans: List[ConnectionPlan] = field(default_factory=list)
    changes: List[str] = field(default_factory=list)

    @property
    def errors(self) -> Dict[str, List[str]]:
        return {cp.connection.uuid: list(cp.errors) for cp in self.plans if cp.errors}

    def plan_of(self, uuid: str) -> Optional[ConnectionPlan]:
        return next((cp for cp in self.plans if cp.connection.uuid == uuid), None)


def _route_key(route: Route) -> tuple:
    return (route.family, route.table, route.dst)


class Engine:
    """The public API: ``reconcile`` a full set of connections, ``ensure`` or ``remove`` one."""

    def __init__(
        self,
        directory: Optional[str] = None,
        defaults: Optional[Mapping[str, str]] = None,
        kernel_factory: Optional[Callable[[], Kernel]] = None,
    ) -> None:
        self.directory = state_dir(directory)
        self.defaults = dict(defaults or {})
        self._kernel_factory = kernel_factory

    def _kernel(self) -> Kernel:
        if self._kernel_factory:
            return self._kernel_factory()
        from .adapters.kernel import LiveKernel

        return LiveKernel()

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

    def known(self) -> Dict[str, Connection]:
        return Record.load(self.directory).connections()

    def record(self) -> Record:
        return Record.load(self.directory)

    # ---- the loop ------------------------------------------------------

    def _run(self, update: Callable[[Dict[str, Connection]], Dict[str, Connection]]) -> Result:
        with locked(self.directory):
            record = Record.load(self.directory)
            conns = update(record.connections())
            kernel = self._kernel()
            try:
                return self._reconcile(kernel, record, conns)
            finally:
                kernel.close()

    def _reconcile(self, kernel: Kernel, record: Record, conns: Dict[str, Connection]) -> Result:
        originals = record.sysctl_originals()
        before = kernel.read(originals)
        the_plan = plan(list(conns.values()), kernel.foreign(), record.allocations(), self.defaults)
        record.set_connections(conns)
        record.set_allocations({**{u: a for u, a in record.allocations().items() if u in conns},
                                **the_plan.allocations})
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
            current = current | todo
            plans.append(cp)
        target = KernelState()
        for cp in plans:
            if cp.status == "ok":
                target = target | cp.state
        try:
            self._set_marks(kernel, before, target, result)
        except PolicyRoutingError as exc:
            for todo in added.values():
                self._undo_adds(kernel, record, todo, before, result)
            plans = [with_status(cp, "error", [_failed(cp, exc)]) if cp.status == "ok" and cp.state else cp
                     for cp in plans]
            target = KernelState(marks=before.marks)
        self._remove_stale(kernel, record, current, target, result)
        try:
            self._verify(kernel, record, target)
        except VerifyError:
            self._rollback(kernel, record, before)
            record.save()
            raise
        result.plans = plans
        self._record_outcomes(record, plans)
        record.save()
        return result

    def _add(self, kernel: Kernel, record: Record, todo: KernelState, result: Result) -> None:
        originals = record.data["sysctls"]
        for entry in sorted(todo.sysctls):
            if slot(entry) not in originals:
                value = kernel.read_sysctl(*entry.slot)
                if value is None:
                    raise KernelError(f"cannot set {entry.name}: interface {entry.iface} does not exist")
                originals[slot(entry)] = value
                record.save()  # the original must survive a crash right after the write
            kernel.write_sysctl(entry)
            result.changes.append(f"set {entry}")
        for route in sorted(todo.routes):
            kernel.add_route(route)
            result.changes.append(f"add {route}")
        for rule in sorted(todo.rules):
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
        kernel.set_marks(target.marks)
        result.changes.append(f"nft table: {len(target.marks)} marking entries")

    def _remove_stale(self, kernel: Kernel, record: Record, current: KernelState, target: KernelState,
                      result: Result) -> None:
        stale = current - target
        for rule in sorted(stale.rules):
            kernel.del_rule(rule)
            result.changes.append(f"delete {rule}")
        replaced = {_route_key(r) for r in target.routes}
        for route in sorted(stale.routes):
            if _route_key(route) not in replaced:  # 'replace' already overwrote it
                kernel.del_route(route)
                result.changes.append(f"delete {route}")
        wanted = {slot(s) for s in target.sysctls}
        for key, original in sorted(record.data["sysctls"].items()):
            if key in wanted:
                continue
            family, iface, name = key.split("/")
            if kernel.read_sysctl(family, iface, name) is not None:
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
