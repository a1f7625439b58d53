"""Taking changes back: one connection's partial adds, or a whole reconcile whose result
did not verify. Every step is tried; a failed one is logged and the others still run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from .errors import PolicyRoutingError
from .model import KernelState, Route, Sysctl
from .record import Record

if TYPE_CHECKING:
    from .reconcile import Kernel, Result

log = logging.getLogger(__name__)


def slot(entry: Sysctl) -> str:
    return "/".join(entry.slot)


def route_key(route: Route) -> tuple:
    """What the kernel keeps one route per (``replace`` overwrites the route with this key)."""
    return (route.family, route.table, route.dst)


def undo_adds(kernel: "Kernel", record: Record, todo: KernelState, before: KernelState,
              result: "Result") -> None:
    """Best effort: take back a connection's adds that were not there before."""
    for rule in sorted(todo.rules - before.rules):
        _quietly(kernel.del_rule, rule)
    kept = {route_key(r): r for r in before.routes}
    for route in sorted(todo.routes - before.routes):
        was = kept.get(route_key(route))
        if was is None:
            _quietly(kernel.del_route, route)
        else:  # 'replace' overwrote the route that was there: put it back
            _quietly(kernel.add_route, was)
    prior = {slot(s): s.value for s in before.sysctls}
    for entry in sorted(todo.sysctls):
        key = slot(entry)
        value = prior.get(key, record.data["sysctls"].get(key))
        if value is not None:
            _quietly(kernel.write_sysctl, Sysctl(entry.family, entry.iface, entry.key, int(value)))
        if key not in prior:
            record.data["sysctls"].pop(key, None)
    result.change("rolled back a connection's partial changes", next(iter(todo.entries()), None))


def roll_back(kernel: "Kernel", record: Record, before: KernelState) -> None:
    """Put back exactly the state found at the start of this reconcile: every step is tried
    (a failed one is logged and the others still run)."""
    log.error("applying failed: rolling back to the state before this change")
    originals = record.sysctl_originals()
    try:
        now = kernel.read(originals)
    except PolicyRoutingError as exc:
        log.error("rollback impossible: %s; run 'nm-policy-routing apply' to converge", exc)
        return
    missing, extra = before - now, now - before
    for entry in sorted(missing.sysctls):
        _quietly(kernel.write_sysctl, entry)
    was = {slot(s) for s in before.sysctls}
    for entry in sorted(extra.sysctls):  # changed in this reconcile from a value recorded now
        if slot(entry) not in was and slot(entry) in originals:
            _quietly(kernel.write_sysctl, Sysctl(entry.family, entry.iface, entry.key, originals[slot(entry)]))
            record.data["sysctls"].pop(slot(entry), None)
    for route in sorted(missing.routes):  # 'replace' also puts back a route that was overwritten
        _quietly(kernel.add_route, route)
    for rule in sorted(missing.rules):
        _quietly(kernel.add_rule, rule)
    if now.marks != before.marks or not kernel.nft_intact:
        _quietly(kernel.set_marks, before.marks)
    for rule in sorted(extra.rules):
        _quietly(kernel.del_rule, rule)
    kept = {route_key(r) for r in before.routes}
    for route in sorted(extra.routes):
        if route_key(route) not in kept:
            _quietly(kernel.del_route, route)


def _quietly(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except PolicyRoutingError as exc:
        log.warning("rollback step failed: %s", exc)
