"""Per-application routing on the command line: ``run --via``, and the apps checks of set/show/status.

``run --via CONNECTION -- COMMAND``: the command runs in a cgroup of its own whose new
sockets carry the connection's mark (a cgroup BPF program), as the calling user (the
sudo caller when run with sudo), with its exit code. The cgroup and its program are
removed when the command and everything it started have exited.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import List, Optional, Tuple

from .cli import EX_FAIL, EX_USAGE, _engine
from .errors import NotPermittedError, PolicyError, PolicyRoutingError
from .model import Allocation, Connection, Policy

log = logging.getLogger(__name__)

#: sent to this process alone (kill, a closed terminal): passed on to the command
FORWARDED = (signal.SIGTERM, signal.SIGHUP)
#: a terminal sends these to the whole foreground group, the command included: ignored here
IGNORED = (signal.SIGINT, signal.SIGQUIT)


# ---- set, show, status -----------------------------------------------------------


def cgroup_support() -> str:
    """One line on what works here: users always; units, cgroups and run --via need cgroup2."""
    from .adapters import cgroups

    kind = cgroups.hierarchy()
    if kind == "unified":
        return "cgroup v2 (unified): users, units, cgroups and 'run --via' are routed"
    if kind == "hybrid":
        return (f"hybrid cgroup hierarchy: units, cgroups and 'run --via' use the cgroup2 tree at "
                f"{cgroups.root()} (a unit is found there only when systemd runs in hybrid mode); users work")
    return ("no cgroup2 hierarchy: only users (user:, uid:) are routed; units, cgroups and 'run --via' "
            "need cgroup v2")


def check_apps(policy: Policy, label: str) -> List[str]:
    """At ``set``: unknown units are errors (PolicyError), but for a scope (transient: it exists only
    while it runs); returns warnings about what will not work now."""
    from .adapters import cgroups

    if not any(a.needs_cgroup for a in policy.apps):
        return []
    problems, warnings = [], []
    for app in policy.apps:
        if app.kind != "unit":
            continue
        state = cgroups.unit_property(app.value, "LoadState")
        if state is None:
            warnings.append(f"cannot ask systemd about {app}: systemd is not running here")
        elif state == "not-found" and app.value.endswith(".scope"):
            warnings.append(f"{app.target} does not exist now (a scope exists only while it runs): its sockets "
                            "are marked when it starts")
        elif state == "not-found":
            problems.append(f"nm-policy-routing.apps={app.target!r}: unknown unit {app.value!r}; "
                            "accepted: a unit systemd knows ('systemctl status NAME')")
    if problems:
        raise PolicyError(label, problems)
    if cgroups.hierarchy() != "unified":
        warnings.append(cgroup_support())
    return warnings


def old_policy(user_data: dict, label: str) -> Optional[Policy]:
    from .policy import parse_policy

    try:
        return parse_policy(user_data, label)
    except PolicyError:
        return None


def services(policy: Optional[Policy]) -> set:
    return {a.value for a in (policy.apps if policy else ()) if a.kind == "unit" and a.value.endswith(".service")}


def sync_unit_dropins(before: Optional[Policy], after: Optional[Policy]) -> List[str]:
    """At ``set``/``unset``: a listed service gets an ExecStartPre drop-in, so that each of its starts
    is marked before its main process runs (a restarted unit has a new cgroup)."""
    import shutil

    from .adapters import cgroups

    exe = shutil.which("nm-policy-routing") or os.path.abspath(sys.argv[0])
    return cgroups.sync_dropins(services(before), services(after), exe)


def cmd_unit_start(args: argparse.Namespace) -> int:
    """ExecStartPre of a listed service: mark this cgroup's sockets if the connection listing it is up."""
    from .adapters import cgroupbpf, cgroups
    from .record import Record, locked, state_dir

    directory = state_dir(args.state_dir)
    if not os.path.exists(os.path.join(directory, "state.json")):
        return 0  # nothing applied since boot
    with locked(directory):
        record = Record.load(directory)
        mark = record.data.get("unit_marks", {}).get(f"unit:{args.unit}")
        path = cgroups.own()
        if not mark or path is None:
            return 0
        known = {int(i): (int(v), int(m)) for i, (v, m) in record.data.get("sockmark_ids", {}).items()}
        prog_id = cgroupbpf.attach(path, int(mark[0]), int(mark[1]), known)
        record.data.setdefault("sockmark_ids", {})[str(prog_id)] = [int(mark[0]), int(mark[1])]
        record.save()
    log.info("unit %s starts with socket mark 0x%x/0x%x (cgroup %s)", args.unit, mark[0], mark[1], path)
    return 0


def app_lines(policy: Optional[Policy], notes: List[str]) -> List[str]:
    if policy is None or not policy.apps:
        return []
    lines = ["apps (new connections leave by this connection): " + ", ".join(map(str, policy.apps))]
    return lines + [f"  {n}" for n in notes]


# ---- run --via ---------------------------------------------------------------------


def _find(args: argparse.Namespace, ref: str) -> Tuple[Connection, Allocation]:
    record = _engine(args).record()
    conns = record.connections()
    match = [c for c in conns.values() if ref in (c.uuid, c.id, c.iface)]
    if not match:
        raise PolicyRoutingError(
            f"connection {ref!r} is not active (or not known to nm-policy-routing): bring it up first "
            "('nmcli connection up ...'), then run again; 'nm-policy-routing status' lists what is applied")
    conn = match[0]
    outcome = record.data["outcomes"].get(conn.uuid, {})
    alloc = record.allocations().get(conn.uuid)
    where = f"connection {conn.label} on {conn.iface}"
    if outcome.get("status") != "ok" or alloc is None:
        errors = "; ".join(outcome.get("errors") or []) or "its policy is not enabled"
        raise PolicyRoutingError(f"{where} has no applied policy ({errors}): set one with "
                                 f"'nm-policy-routing set {conn.id} enable yes'")
    if alloc.fwmark is None:
        raise PolicyRoutingError(f"{where}: its policy routes no mark (match is only 'source'): add 'incoming' or "
                                 f"'outgoing' to nm-policy-routing.match, or list a unit in nm-policy-routing.apps")
    return conn, alloc


def _who() -> Tuple[Optional[int], Optional[int], Optional[str]]:
    """Under sudo: the calling user, whom the command runs as."""
    if os.getuid() != 0 or not os.environ.get("SUDO_UID", "").isdigit():
        return None, None, None
    gid = os.environ.get("SUDO_GID", "")
    return int(os.environ["SUDO_UID"]), int(gid) if gid.isdigit() else None, os.environ.get("SUDO_USER")


def _child(path: str, command: List[str]) -> None:
    """In the forked child: enter the cgroup, drop to the sudo caller, exec. Never returns."""
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as handle:
            handle.write(str(os.getpid()))
        uid, gid, user = _who()
        if uid is not None:
            if gid is not None:
                if user:
                    os.initgroups(user, gid)
                else:
                    os.setgroups([gid])
                os.setgid(gid)
            os.setuid(uid)
        for sig in FORWARDED + IGNORED:
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"nm-policy-routing: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
    finally:
        os._exit(127)  # the child never returns into the parent's code


def cmd_run(args: argparse.Namespace) -> int:
    from .adapters import cgroupbpf, cgroups

    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("nm-policy-routing: run --via CONNECTION -- COMMAND [ARGS...]: no command given", file=sys.stderr)
        return EX_USAGE
    if os.geteuid() != 0:
        raise NotPermittedError(f"run --via {args.via}: attaching the socket mark to a cgroup needs root; run it "
                                "with sudo (the command itself runs as you)")
    conn, alloc = _find(args, args.via)
    assert alloc.fwmark is not None
    path = cgroups.make_run_cgroup()
    try:
        cgroupbpf.attach(path, alloc.fwmark.value, alloc.fwmark.mask)
        pid = os.fork()
        if pid == 0:
            _child(path, command)
        previous = {sig: signal.signal(sig, lambda s, _f: os.kill(pid, s)) for sig in FORWARDED}
        previous.update({sig: signal.signal(sig, signal.SIG_IGN) for sig in IGNORED})
        try:
            _, status = os.waitpid(pid, 0)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        _wait_empty(path)
    finally:
        cgroups.remove_run_cgroup(path)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else EX_FAIL


def _wait_empty(path: str) -> None:
    """Processes the command left running keep their routing: wait for them (they end with it)."""
    import time

    from .adapters import cgroups

    told = False
    while cgroups.populated(path):
        if not told:
            print("nm-policy-routing: waiting for the processes the command left running", file=sys.stderr)
            told = True
        time.sleep(0.1)
