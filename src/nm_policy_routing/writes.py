"""Kernel writes in batches: many connections' entries at once, each refusal mapped back.

The reconcile loop hands over every connection's sysctls, routes and rules of one
address family; routes go to the kernel in one netlink batch, then rules in one
(routes before rules: no rule points at a table without its routes). What the kernel
refuses is the error of the group (connection) the entry belongs to, so its rollback
and its message stay exact. Each kernel write passes its fault point (faults.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Hashable, List, Optional, Sequence, Tuple

from .errors import KernelError, PolicyRoutingError, raise_first
from .faults import fault_point
from .model import KernelState
from .record import Record
from .rollback import slot

if TYPE_CHECKING:
    from .reconcile import Kernel, Result


def add_many(kernel: "Kernel", record: Record, todo: Dict[Hashable, KernelState],
             result: "Result") -> Dict[Hashable, PolicyRoutingError]:
    """Add every group's entries: its sysctls, then all groups' routes, then all rules. A group's
    first refused entry is its error (its later kinds are not sent); the others go on."""
    errors: Dict[Hashable, PolicyRoutingError] = {}
    originals = record.data["sysctls"]
    for key, part in todo.items():
        for entry in sorted(part.sysctls):
            try:
                if slot(entry) not in originals:
                    raise KernelError(f"cannot set {entry.name}: interface {entry.iface} does not exist")
                if kernel.read_sysctl(*entry.slot) == entry.value:
                    continue
                fault_point("sysctl")
                kernel.write_sysctl(entry)
            except PolicyRoutingError as exc:
                errors[key] = exc
                break
            result.change(f"set {entry}", entry)
    for kind, point in (("routes", "route"), ("rules", "rule")):
        batch: List[Tuple[Hashable, Any]] = []
        for key, part in todo.items():
            try:
                for entry in sorted(getattr(part, kind)) if key not in errors else ():
                    fault_point(point)
                    batch.append((key, entry))
            except PolicyRoutingError as exc:  # an injected fault: this entry is refused
                errors[key] = exc
        for (key, entry), error in zip(batch, each(kernel, f"add_{kind}", [e for _, e in batch])):
            if error is None:
                result.change(f"add {entry}", entry)
            elif isinstance(error, PolicyRoutingError):
                errors.setdefault(key, error)
            else:
                raise error
    return errors


def delete_many(kernel: "Kernel", kind: str, entries: Sequence[Any], result: "Result") -> None:
    """Delete ``entries`` (``rules`` or ``routes``) in one batch; the first refusal is raised."""
    for _ in entries:
        fault_point(kind[:-1])
    errors = each(kernel, f"del_{kind}", list(entries))
    for entry, error in zip(entries, errors):
        if error is None:
            result.change(f"delete {entry}", entry)
    raise_first(errors)


def each(kernel: "Kernel", method: str, entries: List[Any]) -> List[Optional[Exception]]:
    """``kernel.add_routes(entries)`` & co.: one batch where the kernel has it (a model of one may
    not: then one call per entry). The error of each entry, None where done."""
    many = getattr(kernel, method, None)
    if many is not None:
        return many(entries) if entries else []
    one, out = getattr(kernel, method[:-1]), []  # add_routes -> add_route
    for entry in entries:
        try:
            one(entry)
            out.append(None)
        except PolicyRoutingError as exc:
            out.append(exc)
    return out
