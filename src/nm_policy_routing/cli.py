"""The command line: ``nm-policy-routing COMMAND``. Data on stdout, diagnostics on stderr.

Exit codes: 0 ok, 1 failure, 2 usage, 65 bad policy (EX_DATAERR), 77 not permitted.
Imports stay inside the commands: ``dispatch`` runs on every NetworkManager event, and
is read without building the parser (``_dispatch_args``), which imports every command.
The parser is also the source of the man page and the bash completion (clidoc.py).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, List, Optional

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("nm_policy_routing")

EX_OK, EX_FAIL, EX_USAGE, EX_DATAERR, EX_NOPERM = 0, 1, 2, 65, 77


def _setup_logging(verbose: bool, service: bool = False) -> None:
    """``service`` (dispatch, daemon): the journal natively under systemd (journal.py)."""
    from .journal import handlers

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers(service))
    for noisy in ("pyroute2", "asyncio"):  # their debug output is not ours to show
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _engine(args: argparse.Namespace, dry_run: bool = False):
    from .reconcile import Engine

    return Engine(args.state_dir, dry_run=dry_run)


def _print_json(data: Any) -> None:
    import json

    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    print()


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


def _active_connections() -> list:
    return _run_nm(lambda nm: nm.active_connections())


# ---- doors: dispatcher hook, daemon --------------------------------------------


def cmd_dispatch(args: argparse.Namespace) -> int:
    """The hook's door: never fails, never blocks NetworkManager for long."""
    try:
        from . import dispatch

        outcome = dispatch.handle(args.iface, args.action, os.environ, lambda: _engine(args))
        log.debug("%s", outcome)  # what changed, if anything, is already logged (story.py)
    except Exception as exc:  # the per-event fence: NetworkManager must go on
        from types import SimpleNamespace

        from .journal import about, named

        uuid = os.environ.get("CONNECTION_UUID", "")
        conn = SimpleNamespace(uuid=uuid or "?", id=os.environ.get("CONNECTION_ID", uuid or "?"), iface=args.iface)
        log.exception("%s: dispatcher event %s failed: %s", named(conn), args.action, exc,
                      extra=about(conn) if uuid else None)
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


# ---- reconcile by hand -----------------------------------------------------------


def _report(args: argparse.Namespace, result, only: Optional[str] = None) -> int:
    """Print a reconcile's outcome; exit 65 for invalid policies, 1 for other errors."""
    code = EX_OK
    plans = [cp for cp in result.plans if not only or only in (cp.connection.uuid, cp.connection.id,
                                                                 cp.connection.iface)]
    for cp in plans:
        for error in cp.errors:
            print(error, file=sys.stderr)
            code = max(code, EX_DATAERR if cp.status == "invalid" else EX_FAIL)
    if getattr(args, "json", False):
        from .report import allocation_json

        _print_json({"changes": result.changes, "commands": result.commands,
                     "connections": [{"uuid": cp.connection.uuid, "id": cp.connection.id,
                                      "status": cp.status, "errors": list(cp.errors),
                                      "allocation": allocation_json(cp.allocation)} for cp in plans]})
    elif args.dry_run:
        from .commands import script

        sys.stdout.write(script(result.commands) or "# nothing to change\n")
    else:
        for change in result.changes:
            print(change)
    return code


def cmd_apply(args: argparse.Namespace) -> int:
    from .errors import NetworkManagerError
    from .faults import pause_point

    engine = _engine(args, args.dry_run)
    seen: dict = {}

    def snapshot() -> Optional[list]:  # called with the reconcile lock held
        try:
            conns = _active_connections()
        except NetworkManagerError as exc:
            print(f"nm-policy-routing: {exc}; re-applying the connections recorded before", file=sys.stderr)
            conns = None
        seen["conns"] = conns
        pause_point("apply-snapshot")
        return conns

    result = engine.reconcile(snapshot)
    conns = seen.get("conns")
    if args.connection and conns is not None and not any(
            args.connection in (c.uuid, c.id, c.iface) for c in conns):
        print(f"nm-policy-routing: connection {args.connection!r} is not active; "
              "its policy applies when it comes up", file=sys.stderr)
    return _report(args, result, args.connection)


def _resolve_recorded(args: argparse.Namespace, ref: str) -> str:
    for uuid, conn in _engine(args).known().items():
        if ref in (uuid, conn.id, conn.iface):
            return uuid
    from .errors import PolicyRoutingError

    raise PolicyRoutingError(f"no applied connection {ref!r} (give its id, UUID or interface; "
                             "'nm-policy-routing status' lists them)")


def cmd_remove(args: argparse.Namespace) -> int:
    engine = _engine(args, args.dry_run)
    if args.connection:
        result = engine.remove(_resolve_recorded(args, args.connection))
        if not args.dry_run:
            print(f"removed; the policy comes back when the connection is activated again or the daemon "
                  f"re-syncs: to disable it, 'nm-policy-routing set {args.connection} enable no'",
                  file=sys.stderr)
    else:
        result = engine.flush()
    return _report(args, result)


def cmd_flush(args: argparse.Namespace) -> int:
    return _report(args, _engine(args, args.dry_run).flush())


# ---- status, explain ----------------------------------------------------------


def _inactive_profiles(known: set) -> list:
    from .model import PREFIX

    async def go(nm):
        out = []
        for _, settings in await nm.profiles():
            conn, user = settings.get("connection", {}), settings.get("user", {}).get("data", {})
            if conn.get("uuid") not in known and any(k.startswith(PREFIX) for k in user):
                out.append((conn.get("uuid"), conn.get("id"), conn.get("interface-name", "")))
        return out

    return _run_nm(go)


def cmd_status(args: argparse.Namespace) -> int:
    from .errors import NetworkManagerError
    from .report import status_rows, status_text

    engine = _engine(args)
    inspection = engine.inspect()
    record = engine.record()
    try:
        inactive = _inactive_profiles({cp.connection.uuid for cp in inspection.plans})
    except NetworkManagerError as exc:
        print(f"nm-policy-routing: {exc}; inactive profiles are not listed", file=sys.stderr)
        inactive = []
    rows = status_rows(inspection.plans, inspection.current, inspection.drift, record.data["outcomes"],
                       inactive, args.all, inspection.caveats)
    from .cli_apps import cgroup_support

    notes = record.data.get("app_notes", {})
    for row in rows:
        row["apps_notes"] = list(notes.get(row["uuid"], []))
    apps_note = cgroup_support() if any(cp.policy and cp.policy.apps for cp in inspection.plans) else None
    if args.json:
        _print_json({"connections": rows, "stray": inspection.stray, "apps": apps_note,
                     "foreign_marks": [{"mark": str(m), "owner": o} for m, o in inspection.foreign.marks]})
    else:
        sys.stdout.write(status_text(rows, inspection.stray, args.verbose))
        for row in rows:
            for note in row["apps_notes"]:
                print(f"apps: {note}")
        if apps_note:
            print(f"apps: {apps_note}")
    return EX_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain, explain_text

    answer = explain(args.destination, source=args.source, iif=args.iif, mark=args.mark, uid=args.uid,
                     unit=args.unit)
    if args.json:
        _print_json(answer)
    else:
        sys.stdout.write(explain_text(answer))
    return EX_OK


def cmd_completion(args: argparse.Namespace) -> int:
    from .clidoc import bash_completion

    sys.stdout.write(bash_completion(build_parser()))
    return EX_OK


def cmd_manpage(args: argparse.Namespace) -> int:
    from .clidoc import manpage

    sys.stdout.write(manpage(build_parser()))
    return EX_OK


# ---- the parser ------------------------------------------------------------------

EPILOG = """examples (the seed: eth1 is the service interface):
  nm-policy-routing set eth1 enable yes table 100 fwmark 0x1 priority 1000
  nm-policy-routing show eth1
  nm-policy-routing status
  nm-policy-routing explain 10.0.9.2 --from 10.0.1.2 --iif eth1
  nm-policy-routing apply --dry-run
  sudo nm-policy-routing run --via eth1 -- curl https://example.org/

exit codes: 0 ok, 1 failure, 2 usage, 65 invalid policy, 77 not permitted"""


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="nm-policy-routing", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Per-connection policy routing for NetworkManager: replies leave by the interface "
                    "the request came in on; connections stay on their interface.")
    parser.add_argument("--state-dir", metavar="DIR", help="where the record lives (default /run/nm-policy-routing)")
    parser.add_argument("-v", "--verbose", action="store_true", help="more detail (debug log, installed entries)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func, help_text: str, json_flag: bool = False, dry_run: bool = False):
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if dry_run:
            p.add_argument("--dry-run", action="store_true",
                           help="print the equivalent nft/ip/sysctl commands instead of applying")
        return p

    from .cli_profile import cmd_set, cmd_show, cmd_unset

    p = add("set", cmd_set, "write policy keys into a connection profile (validated first)")
    p.add_argument("connection", help="connection id, UUID or interface name")
    p.add_argument("pairs", nargs="+", metavar="KEY VALUE", help="keys with or without 'nm-policy-routing.'")
    p = add("unset", cmd_unset, "remove policy keys from a connection profile")
    p.add_argument("connection", help="connection id, UUID or interface name")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p = add("show", cmd_show, "a connection's effective policy, where each value comes from, and its "
            "allocations", json_flag=True)
    p.add_argument("connection", help="connection id, UUID or interface name")
    p = add("status", cmd_status, "every connection with a policy: applied, not active, error or drift",
            json_flag=True)
    p.add_argument("--all", action="store_true", help="also active connections without a policy")
    p = add("explain", cmd_explain, "how a packet to DESTINATION is routed, and what our policy changed",
            json_flag=True)
    p.add_argument("destination", help="destination address")
    p.add_argument("--from", dest="source", metavar="ADDR", help="source address (a reply's: this host's)")
    p.add_argument("--iif", metavar="IFACE",
                   help="the connection came in on IFACE (our incoming marking applies to its reply)")
    p.add_argument("--mark", metavar="MARK", help="the packet's mark (decimal or 0x hex)")
    p.add_argument("--uid", metavar="USER", help="a new connection of this user (uid or name)")
    p.add_argument("--unit", metavar="UNIT", help="a new connection of this systemd unit (or cgroup:/PATH)")
    p = add("apply", cmd_apply, "reconcile every active connection now", json_flag=True, dry_run=True)
    p.add_argument("connection", nargs="?", help="report only this connection (id, UUID or interface)")
    p = add("remove", cmd_remove, "remove a connection's policy from the kernel (all without CONNECTION)",
            json_flag=True, dry_run=True)
    p.add_argument("connection", nargs="?", help="connection id, UUID or interface name")
    from .cli_apps import cmd_run, cmd_unit_start

    p = add("run", cmd_run, "run one command whose new connections leave by CONNECTION (as the calling user)")
    p.add_argument("--via", required=True, metavar="CONNECTION", help="connection id, UUID or interface name")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    p = add("unit-start", cmd_unit_start, "mark the sockets of a starting service listed in apps (its "
            "ExecStartPre drop-in calls it)")
    p.add_argument("unit")
    add("flush", cmd_flush, "remove everything of ours from the kernel", json_flag=True, dry_run=True)
    p = add("dispatch", cmd_dispatch, "handle one NetworkManager dispatcher event (the hook calls it)")
    p.add_argument("iface")
    p.add_argument("action")
    add("daemon", cmd_daemon, "follow NetworkManager over D-Bus and keep every policy applied")
    add("completion", cmd_completion, "print the bash completion script")
    add("manpage", cmd_manpage, "print the man page (roff)")
    return parser


def _dispatch_args(argv: List[str]) -> Optional[Any]:
    """``[--state-dir DIR] [-v] dispatch IFACE ACTION`` read as the parser would, without building
    it (the hook runs this at every event); None for anything else (the parser reads it)."""
    from types import SimpleNamespace

    args = SimpleNamespace(state_dir=None, verbose=False, command="dispatch", func=cmd_dispatch)
    words = list(argv)
    while words and words[0] != "dispatch":
        word = words.pop(0)
        if word in ("-v", "--verbose"):
            args.verbose = True
        elif word == "--state-dir" and words and not words[0].startswith("-"):
            args.state_dir = words.pop(0)
        elif word.startswith("--state-dir=") and len(word) > len("--state-dir="):
            args.state_dir = word[len("--state-dir="):]
        else:
            return None
    if len(words) != 3 or any(word.startswith("-") for word in words[1:]):
        return None
    args.iface, args.action = words[1:]
    return args


def _end_now(code: int) -> None:
    """End the hook's process without the interpreter's teardown of every module (~5 ms with
    the engine loaded): what it did is done (the record saved and synced, the kernel changed);
    only the log and the standard streams need flushing."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    args = _dispatch_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, service=args.command in ("dispatch", "daemon"))
    if args.command == "dispatch":
        code = args.func(args)  # never raises
        if argv is None:  # the process the hook started
            _end_now(code)
        return code
    from .errors import PolicyRoutingError

    try:
        return args.func(args)
    except PolicyRoutingError as exc:
        print(f"nm-policy-routing: {exc}", file=sys.stderr)
        return exc.exit_code
    except PermissionError as exc:
        print(f"nm-policy-routing: {exc} (run as root)", file=sys.stderr)
        return EX_NOPERM
    except KeyboardInterrupt:
        return EX_FAIL
