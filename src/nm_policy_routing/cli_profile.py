"""The profile commands: ``set``, ``unset`` and ``show`` a connection's policy keys.

Profiles are read and written through NetworkManager (``GetSettings``/``Update2``), so
NetworkManager's authorization applies; values are validated before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict

from .cli import EX_DATAERR, EX_OK, EX_USAGE, _active_connections, _engine, _print_json, _run_nm


def _full_key(key: str) -> str:
    from .model import PREFIX

    return key if key.startswith(PREFIX) else PREFIX + key


def _write_policy(args: argparse.Namespace, change: Callable[[Dict[str, str]], Dict[str, str]]) -> int:
    """Read the profile's user data, change it, validate, write it back (Update2)."""
    from .adapters.networkmanager import ACTIVATED
    from .errors import NotPermittedError, PolicyError
    from .policy import parse_policy

    async def go(nm):
        path, settings = await nm.find_profile(args.connection)
        conn = settings.get("connection", {})
        label = f"{conn.get('id')} ({conn.get('uuid')})"
        current = dict(settings.get("user", {}).get("data", {}))
        new = change(current)
        parse_policy(new, label)  # raises PolicyError: nothing is written
        if new != current:
            try:
                await nm.set_user_data(path, new)
            except NotPermittedError as exc:
                raise NotPermittedError(refusal(conn, exc)) from exc
        return label, await nm.active_state(conn.get("uuid", ""))

    try:
        label, state = _run_nm(go)
    except PolicyError as exc:
        print(f"nm-policy-routing: {exc}\nnothing was changed in the profile", file=sys.stderr)
        return EX_DATAERR
    print(f"connection {label}: policy saved")
    if state == ACTIVATED and not _daemon_running(args):
        result = _engine(args).reconcile(_active_connections)  # read under the lock
        for change_line in result.changes:
            print(change_line)
    return EX_OK


MODIFY_SYSTEM = "org.freedesktop.NetworkManager.settings.modify.system"


def refusal(conn: Dict[str, str], exc: Exception) -> str:
    """NetworkManager refused to change a profile: say it in the user's words, and what to do."""
    iface = conn.get("interface-name") or "any interface"
    return (f"not permitted to modify connection '{conn.get('id')}' ({conn.get('uuid')}, {iface}): "
            f"NetworkManager lets only users authorized for the polkit action {MODIFY_SYSTEM} "
            "change a system connection. Nothing was changed. Run the command with sudo, or allow "
            "a group that action with a polkit rule, e.g. /etc/polkit-1/rules.d/50-nm-policy-routing.rules:\n"
            "  polkit.addRule(function(action, subject) {\n"
            f"      if (action.id == \"{MODIFY_SYSTEM}\" && subject.isInGroup(\"netadmin\"))\n"
            "          return polkit.Result.YES;\n"
            "  });\n"
            f"(NetworkManager said: {exc})")


def _daemon_running(args: argparse.Namespace) -> bool:
    from .daemonlock import held
    from .record import state_dir

    return held(state_dir(args.state_dir))


def cmd_set(args: argparse.Namespace) -> int:
    if len(args.pairs) % 2:
        print("nm-policy-routing: set takes KEY VALUE pairs, e.g. 'set eth1 enable yes table 100'",
              file=sys.stderr)
        return EX_USAGE
    pairs = {_full_key(k): v for k, v in zip(args.pairs[::2], args.pairs[1::2])}
    return _write_policy(args, lambda current: {**current, **pairs})


def cmd_unset(args: argparse.Namespace) -> int:
    keys = {_full_key(k) for k in args.keys}
    return _write_policy(args, lambda current: {k: v for k, v in current.items() if k not in keys})


def cmd_show(args: argparse.Namespace) -> int:
    from .config import load
    from .model import Connection
    from .planner import plan
    from .report import allocation_json, show_rows, show_text

    async def go(nm):
        path, settings = await nm.find_profile(args.connection)
        conn = settings.get("connection", {})
        active = [c for c in await nm.active_connections() if c.uuid == conn.get("uuid")]
        return settings, conn, active

    settings, conn, active = _run_nm(go)
    user = dict(settings.get("user", {}).get("data", {}))
    facts = active[0] if active else Connection(
        uuid=conn.get("uuid", ""), id=conn.get("id", ""), iface=conn.get("interface-name", "") or "",
        user_data=tuple(sorted(user.items())), type=conn.get("type", ""))
    defaults = load()
    engine = _engine(args)
    inspection = engine.inspect()
    others = [c for c in engine.known().values() if c.uuid != facts.uuid]
    cp = plan([facts, *others], inspection.foreign, engine.record().allocations(), defaults).get(facts.uuid)
    rows = show_rows(user, defaults.with_sources(facts))
    if args.json:
        _print_json({"uuid": facts.uuid, "id": facts.id, "iface": facts.iface or None, "active": bool(active),
                     "keys": rows, "status": cp.status if cp else None, "errors": list(cp.errors) if cp else [],
                     "allocation": allocation_json(cp.allocation) if cp else None})
    else:
        header = f"connection {facts.id} ({facts.uuid}) on {facts.iface or '-'}, " \
                 f"{'active' if active else 'not active'}"
        sys.stdout.write(show_text(header, rows, cp))
    return EX_DATAERR if cp and cp.status == "invalid" else EX_OK
