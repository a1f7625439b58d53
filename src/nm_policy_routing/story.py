"""Whose is each change of a reconcile, and how its outcome is told in the log.

One log entry per connection and event, naming the connection in the text and in the
journal's fields (journal.py): ``policy applied`` / ``repaired`` / ``removed`` at info
with the changes made, a refused policy at error; a change shared by all connections
(the nft table rewritten) has an entry of its own.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple

from .model import Allocation, Connection, ConnectionPlan, Fwmark, Mark, Route, Rule, Sysctl

if TYPE_CHECKING:
    from .reconcile import Result

log = logging.getLogger(__name__)


def owners_of(previous: Dict[str, Connection], allocations: Dict[str, Allocation],
              plans: Iterable[ConnectionPlan]) -> Callable[[Any], Optional[Connection]]:
    """Whose is a kernel entry: by table (rules, routes), interface (marking, sysctls) or mark,
    among the connections known before this reconcile and those planned now (these win)."""
    by_table: Dict[int, Connection] = {}
    by_iface: Dict[str, Connection] = {}
    by_mark: Dict[Fwmark, Connection] = {}

    def know(conn: Connection, alloc: Optional[Allocation]) -> None:
        if conn.iface:
            by_iface[conn.iface] = conn
        if alloc is not None:
            by_table[alloc.table] = conn
            if alloc.fwmark is not None:
                by_mark[alloc.fwmark] = conn

    for uuid, conn in previous.items():
        know(conn, allocations.get(uuid))
    for cp in plans:
        know(cp.connection, cp.allocation)

    def owner(entry: Any) -> Optional[Connection]:
        if isinstance(entry, Rule) and entry.iif:  # an incoming policy's forward rule (lookup main)
            return by_iface.get(entry.iif)
        if isinstance(entry, (Rule, Route)):
            return by_table.get(entry.table)
        if isinstance(entry, (Mark, Sysctl)):
            return by_iface.get(entry.iface)
        if isinstance(entry, Fwmark):
            return by_mark.get(entry)
        return None
    return owner


def entries(result: "Result", why: str = "") -> List[Tuple[int, Optional[Connection], str]]:
    """(level, connection, text) for each log entry telling ``result``; pure, for tests. ``why``:
    the event that caused it, when one did (the daemon's events about one connection)."""
    from .journal import named

    active = {cp.connection.uuid: cp for cp in result.plans}
    grouped: Dict[str, Tuple[Connection, List[str]]] = {}
    shared: List[str] = []
    for conn, text in result.attributed:
        if conn is None:
            shared.append(text)
        else:
            grouped.setdefault(conn.uuid, (active[conn.uuid].connection if conn.uuid in active else conn, []))
            grouped[conn.uuid][1].append(text)
    out: List[Tuple[int, Optional[Connection], str]] = []
    for uuid, (conn, changes) in grouped.items():
        cp = active.get(uuid)
        level = logging.INFO
        if cp is None or cp.status == "disabled":
            what = "policy removed"
        elif cp.status == "ok":
            what = "policy applied" if any(c.startswith(("add", "set")) for c in changes) else "policy updated"
        else:  # refused: what it had added is taken back; the error below tells the event
            what, level = "partial changes rolled back", logging.DEBUG
        out.append((level, conn, f"{named(conn)}: {what}{f' on {why}' if why else ''}: {'; '.join(changes)}"))
    for text in shared:
        out.append((logging.INFO, None, text))
    for cp in result.plans:
        if cp.errors:
            why = {"invalid": "invalid policy", "conflict": "conflicts with state that is not ours"}.get(
                cp.status, "not applied")
            inner = f"connection {cp.connection.label} on {cp.connection.iface}: "  # reconcile's own naming
            problems = "; ".join(e[len(inner):] if e.startswith(inner) else e for e in cp.errors)
            if cp.status == "ok":  # one family failed, the other is in place
                out.append((logging.ERROR, cp.connection, f"{named(cp.connection)}: policy applied in part: {problems}"))
            else:
                out.append((logging.ERROR, cp.connection,
                            f"{named(cp.connection)}: policy refused ({why}), nothing of it is installed: {problems}"))
    return out


def tell(result: "Result", seen: Optional[Dict[str, Tuple[str, ...]]] = None, why: str = "") -> None:
    """Log ``result``. ``seen``: the errors last told per connection (the daemon's); an error
    already told is not repeated at every resync, only when it changes."""
    from .journal import about

    refused = {cp.connection.uuid: tuple(cp.errors) for cp in result.plans if cp.errors}
    for level, conn, text in entries(result, why):
        if level >= logging.ERROR and conn is not None and seen is not None \
                and seen.get(conn.uuid) == refused.get(conn.uuid):
            continue
        log.log(level, "%s", text, extra=about(conn) if conn is not None else None)
    if seen is not None:
        seen.clear()
        seen.update(refused)
