"""Pure: what ``status`` and ``show`` print, as rows (for --json) and as human text."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .model import PREFIX, Allocation, ConnectionPlan, KernelState
from .policy import KEYS

BUILT_IN = {"enable": "no", "table": "auto", "fwmark": "auto", "priority": "auto", "match": "incoming",
            "src-valid-mark": "yes", "rp-filter": "keep", "family": "both", "routes": ""}
STATUS_WORDS = {"ok": "applied", "invalid": "error", "conflict": "conflict", "error": "error",
                "disabled": "disabled"}


def allocation_json(alloc: Optional[Allocation]) -> Optional[Dict[str, Any]]:
    if alloc is None:
        return None
    return {"table": alloc.table, "priority": alloc.priority,
            "fwmark": str(alloc.fwmark) if alloc.fwmark else None}


def status_rows(plans: Iterable[ConnectionPlan], current: KernelState, drift: Mapping[str, List[str]],
                outcomes: Mapping[str, Mapping[str, Any]], inactive: Iterable[Tuple[str, str, str]],
                include_disabled: bool = False,
                caveats: Optional[Mapping[str, List[str]]] = None) -> List[Dict[str, Any]]:
    rows = []
    for cp in plans:
        uuid = cp.connection.uuid
        if cp.status == "disabled" and not include_disabled:
            continue
        recorded = outcomes.get(uuid, {})
        status, errors = STATUS_WORDS.get(cp.status, cp.status), list(cp.errors)
        if cp.status == "ok" and recorded.get("status") == "error":
            status, errors = "error", list(recorded.get("errors", []))
        installed = [str(e) for e in cp.state.entries() if e in _all(current)]
        if status == "applied" and drift.get(uuid):
            status = "drift"
        rows.append({"uuid": uuid, "id": cp.connection.id, "iface": cp.connection.iface, "status": status,
                     "reason": None if status in ("applied", "drift") else cp.status, "errors": errors, "allocation": allocation_json(cp.allocation),
                     "installed": installed, "drift": list(drift.get(uuid, [])),
                     "warnings": list((caveats or {}).get(uuid, []))})
    for uuid, name, iface in inactive:
        rows.append({"uuid": uuid, "id": name, "iface": iface or None, "status": "not active", "reason": None,
                     "errors": [],
                     "allocation": None, "installed": [], "drift": [], "warnings": []})
    return rows


def _all(state: KernelState) -> set:
    return set(state.rules) | set(state.routes) | set(state.marks) | set(state.sysctls)


def status_text(rows: List[Dict[str, Any]], stray: List[str], verbose: bool = False) -> str:
    if not rows and not stray:
        return "no connection has a policy\n"
    head = f"{'CONNECTION':<20} {'INTERFACE':<15} {'STATUS':<10} {'TABLE':>6} {'PRIORITY':>8}  FWMARK"
    lines = [head]
    for row in rows:
        alloc = row["allocation"] or {}
        lines.append(f"{row['id'][:20]:<20} {(row['iface'] or '-')[:15]:<15} {row['status']:<10} "
                     f"{alloc.get('table', '-'):>6} {alloc.get('priority', '-'):>8}  {alloc.get('fwmark') or '-'}")
        lines += [f"    error: {e}" for e in row["errors"]]
        lines += [f"    drift: {d}" for d in row["drift"]]
        lines += [f"    warning: {w}" for w in row.get("warnings", [])]
        if verbose:
            lines += [f"    installed: {i}" for i in row["installed"]]
    lines += [f"stray: {s}" for s in stray]
    if any(row["drift"] for row in rows) or stray:
        lines.append("run 'nm-policy-routing apply' to repair")
    return "\n".join(lines) + "\n"


def show_rows(user: Mapping[str, str], defaults: Mapping[str, Tuple[str, str]]) -> List[Dict[str, str]]:
    """Each key's effective value and where it came from: profile, defaults file, built-in."""
    rows = []
    for key in KEYS:
        if PREFIX + key in user:
            value, source = user[PREFIX + key], "profile"
        elif key in defaults:
            value, source = defaults[key]
        else:
            value, source = BUILT_IN[key], "built-in default"
        rows.append({"key": PREFIX + key, "value": value, "source": source})
    return rows


def show_text(header: str, rows: List[Dict[str, str]], cp: Optional[ConnectionPlan]) -> str:
    lines = [header, f"{'KEY':<34} {'VALUE':<24} FROM"]
    for row in rows:
        lines.append(f"{row['key']:<34} {(row['value'] or '(none)')[:24]:<24} {row['source']}")
    if cp is not None:
        if cp.errors:
            lines += [f"error: {e}" for e in cp.errors]
        elif cp.allocation:
            a = cp.allocation
            mark = f", fwmark {a.fwmark}" if a.fwmark else ""
            lines.append(f"resolves to: table {a.table}, priority {a.priority}{mark}")
        elif cp.status == "disabled":
            lines.append("policy disabled: nothing is installed for this connection")
    return "\n".join(lines) + "\n"
