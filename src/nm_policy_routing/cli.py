"""The command line: ``nm-policy-routing COMMAND``. Data on stdout, diagnostics on stderr.

Exit codes: 0 ok, 1 failure, 2 usage, 65 bad policy (EX_DATAERR), 77 not permitted.
Imports stay inside the commands: ``dispatch`` runs on every NetworkManager event.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional

log = logging.getLogger("nm_policy_routing")

EX_OK, EX_FAIL, EX_USAGE, EX_DATAERR, EX_NOPERM = 0, 1, 2, 65, 77


def _setup_logging(verbose: bool, syslog: bool = False) -> None:
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if syslog and os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address="/dev/log")
        handler.ident = "nm-policy-routing: "
        handlers.append(handler)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(message)s", handlers=handlers)


def _engine(args: argparse.Namespace):
    from .reconcile import Engine

    return Engine(args.state_dir)


def cmd_dispatch(args: argparse.Namespace) -> int:
    """The hook's door: never fails, never blocks NetworkManager for long."""
    try:
        from . import dispatch

        outcome = dispatch.handle(args.iface, args.action, os.environ, _engine(args))
        log.info("%s", outcome)
    except Exception as exc:  # the per-event fence: NetworkManager must go on
        log.exception("dispatcher event %s on %s failed: %s", args.action, args.iface, exc)
        _record_dispatch_error(args, f"dispatcher event {args.action} on {args.iface}: {exc}")
    return EX_OK


def _record_dispatch_error(args: argparse.Namespace, text: str) -> None:
    try:
        from .record import Record, locked, state_dir

        directory = state_dir(args.state_dir)
        with locked(directory):
            record = Record.load(directory)
            uuid = os.environ.get("CONNECTION_UUID", "?")
            record.set_outcome(uuid, {"id": os.environ.get("CONNECTION_ID", uuid), "iface": args.iface,
                                      "status": "error", "errors": [text]})
            record.save()
    except Exception:  # recording is best effort inside the fence
        log.exception("cannot record the error")


def cmd_daemon(args: argparse.Namespace) -> int:
    from . import daemon

    daemon.run(_engine(args))
    return EX_OK


def _active_connections() -> list:
    import asyncio

    from .adapters.networkmanager import NetworkManagerBus

    async def snapshot():
        nm = await NetworkManagerBus().connect()
        try:
            return await nm.active_connections()
        finally:
            nm.disconnect()

    return asyncio.run(snapshot())


def cmd_apply(args: argparse.Namespace) -> int:
    engine = _engine(args)
    result = engine.reconcile(_active_connections())
    for change in result.changes:
        print(change)
    code = EX_OK
    for cp in result.plans:
        if args.connection and args.connection not in (cp.connection.uuid, cp.connection.id, cp.connection.iface):
            continue
        for error in cp.errors:
            print(error, file=sys.stderr)
            code = EX_DATAERR if cp.status == "invalid" else EX_FAIL
    return code


def _run_nm(coro_fn):
    """Run ``coro_fn(nm)`` against NetworkManager on the system bus."""
    import asyncio

    from .adapters.networkmanager import NetworkManagerBus

    async def go():
        nm = await NetworkManagerBus().connect()
        try:
            return await coro_fn(nm)
        finally:
            nm.disconnect()

    return asyncio.run(go())


def _full_key(key: str) -> str:
    from .model import PREFIX

    return key if key.startswith(PREFIX) else PREFIX + key


def _write_policy(args: argparse.Namespace, change: Callable[[Dict[str, str]], Dict[str, str]]) -> int:
    """Read the profile's user data, change it, validate, write it back (Update2)."""
    from .errors import PolicyError
    from .policy import parse_policy

    async def go(nm):
        path, settings = await nm.find_profile(args.connection)
        conn = settings.get("connection", {})
        label = f"{conn.get('id')} ({conn.get('uuid')})"
        current = dict(settings.get("user", {}).get("data", {}))
        new = change(current)
        try:
            parse_policy(new, label)
        except PolicyError as exc:
            print(f"nm-policy-routing: {exc}", file=sys.stderr)
            print("nothing was changed in the profile", file=sys.stderr)
            return EX_DATAERR, label, None
        if new != current:
            await nm.set_user_data(path, new)
        state = await nm.active_state(conn.get("uuid", ""))
        return EX_OK, label, state

    code, label, state = _run_nm(go)
    if code != EX_OK:
        return code
    print(f"connection {label}: policy saved")
    from .adapters.networkmanager import ACTIVATED

    if state == ACTIVATED and not _daemon_running(args):
        engine = _engine(args)
        result = engine.reconcile(_active_connections())
        for change in result.changes:
            print(change)
    return EX_OK


def _daemon_running(args: argparse.Namespace) -> bool:
    import fcntl

    from .record import state_dir

    path = os.path.join(state_dir(args.state_dir), "daemon.lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def cmd_set(args: argparse.Namespace) -> int:
    if len(args.pairs) % 2:
        print("nm-policy-routing: set takes KEY VALUE pairs", file=sys.stderr)
        return EX_USAGE
    pairs = {_full_key(k): v for k, v in zip(args.pairs[::2], args.pairs[1::2])}
    return _write_policy(args, lambda current: {**current, **pairs})


def cmd_unset(args: argparse.Namespace) -> int:
    keys = {_full_key(k) for k in args.keys}
    return _write_policy(args, lambda current: {k: v for k, v in current.items() if k not in keys})


def cmd_flush(args: argparse.Namespace) -> int:
    result = _engine(args).flush()
    for change in result.changes:
        print(change)
    return EX_OK


def cmd_status(args: argparse.Namespace) -> int:
    record = _engine(args).record()
    rows = []
    for uuid, outcome in sorted(record.data.get("outcomes", {}).items()):
        if outcome.get("status") == "disabled" and not args.all:
            continue
        rows.append({"uuid": uuid, **{k: outcome.get(k) for k in ("id", "iface", "status", "errors")},
                     "allocation": record.data["allocations"].get(uuid)})
    if args.json:
        json.dump({"connections": rows}, sys.stdout, indent=2)
        print()
        return EX_OK
    if not rows:
        print("no connection has a policy")
    for row in rows:
        alloc = row["allocation"] or {}
        where = f" table {alloc.get('table')} priority {alloc.get('priority')}" if alloc else ""
        print(f"{row['id']:<20} {row['iface'] or '-':<15} {row['status']:<9}{where}")
        for error in row["errors"] or ():
            print(f"    {error}")
    return EX_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nm-policy-routing",
                                     description="Per-connection policy routing for NetworkManager.")
    parser.add_argument("--state-dir", help="where the record lives (default /run/nm-policy-routing)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("dispatch", help="handle one NetworkManager dispatcher event (used by the hook)")
    p.add_argument("iface")
    p.add_argument("action")
    p.set_defaults(func=cmd_dispatch)

    p = sub.add_parser("daemon", help="follow NetworkManager over D-Bus and keep policies applied")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("apply", help="reconcile every active connection now")
    p.add_argument("connection", nargs="?", help="report only this connection (id, UUID or interface)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("set", help="write policy keys into a connection profile")
    p.add_argument("connection", help="connection id, UUID or interface name")
    p.add_argument("pairs", nargs="+", metavar="KEY VALUE", help="e.g. enable yes table 100")
    p.set_defaults(func=cmd_set)

    p = sub.add_parser("unset", help="remove policy keys from a connection profile")
    p.add_argument("connection", help="connection id, UUID or interface name")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.set_defaults(func=cmd_unset)

    p = sub.add_parser("flush", help="remove everything of ours from the kernel")
    p.set_defaults(func=cmd_flush)

    p = sub.add_parser("status", help="every connection with a policy and how it went")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="also active connections without a policy")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, syslog=args.command in ("dispatch", "daemon"))
    from .errors import PolicyRoutingError

    try:
        return args.func(args)
    except PolicyRoutingError as exc:
        print(f"nm-policy-routing: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EX_FAIL
