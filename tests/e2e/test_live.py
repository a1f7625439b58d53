"""Live hosts: a local user against the hook's lock, a bus that dies under the daemon,
the CLI racing the hook — against a real NetworkManager."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from typing import Iterator, List

import pytest

from tests.lab.netns import Lab, Seed, run, wait_for
from tests.lab.world import CLI, World

pytestmark = pytest.mark.nm

SEED = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "100",
        "nm-policy-routing.fwmark": "0x1", "nm-policy-routing.priority": "1000"}
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def seed_rule(rules) -> bool:
    return any(r.get("priority") == 1000 and r.get("table") == "100" for r in rules)


@pytest.fixture
def hooked(lab: Lab) -> Iterator[World]:
    w = World(lab, hook=True)
    try:
        w.nm.seed_keyfiles(user_service=SEED)
        w.nm.up("mgmt")
        yield w
    finally:
        print(w.daemon_tail())
        w.close()


# ---- 4: only root can make the hook step aside ------------------------------------


def _plant(w: World, kind: str) -> str:
    """A daemon.lock another user can open: 0644 as an older version left it, or a
    symlink to a file of that user's."""
    lock = os.path.join(w.state_dir, "daemon.lock")
    if kind == "0644":
        with open(lock, "w"):
            pass
        os.chmod(lock, 0o644)
    else:
        target = os.path.join(w.base, "users-file")
        with open(target, "w"):
            pass
        os.chown(target, 65534, 65534)
        os.symlink(target, lock)
    return lock


def _held(lock: str) -> bool:
    return run(["flock", "-n", lock, "true"], check=False).returncode != 0


@pytest.mark.parametrize("kind", ["0644", "symlink"])
def test_a_local_user_cannot_switch_the_hook_off(hooked: World, kind: str) -> None:
    w = hooked
    os.chmod(w.base, 0o755)  # as /run: every user can reach the state directory
    lock = _plant(w, kind)
    holder = subprocess.Popen([*NOBODY, "flock", "-s", lock, "sleep", "300"], stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: _held(lock) or holder.poll() is not None, timeout=10)
        assert holder.poll() is None, f"the user could not even take the planted lock: {holder.stderr.read()}"
        # the hook still acts
        w.nm.up("service")
        assert w.wait_rules(seed_rule), "the hook stepped aside for a lock held by user nobody"
        # a starting daemon is not stopped by it, and its lock is root's alone
        w.start_daemon()
        st = os.lstat(lock)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert "replacing" in w.daemon_tail(50)
        proc = run([*NOBODY, "flock", "-n", "-s", lock, "true"], check=False)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, (proc.returncode, proc.stderr)
        # the hook defers to the real daemon, which follows NetworkManager
        w.nm.down("service")
        assert w.wait_rules(lambda rules: not rules)
        w.nm.up("service")
        assert w.wait_rules(seed_rule)
    finally:
        holder.kill()
        holder.wait()


# ---- 8: a bus that dies under the daemon ----------------------------------------


def start_watched_daemon(w: World, watchdog_usec: int) -> socket.socket:
    """The daemon as systemd runs it with WatchdogSec: the notify socket stays open for the test."""
    path = os.path.join(w.base, "notify-watch.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    env = w.cli_env()
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC=str(watchdog_usec))
    w.daemon_log = open(os.path.join(w.base, "daemon.log"), "a")
    w.daemon = subprocess.Popen(["ip", "netns", "exec", w.host.name, CLI, "-v", "daemon"], env=env,
                                stdout=w.daemon_log, stderr=subprocess.STDOUT)
    return sock


def notifications(sock: socket.socket, wait: float) -> List[str]:
    """Every message that arrives within ``wait`` seconds (at least the first one waited for)."""
    out: List[str] = []
    sock.settimeout(wait)
    try:
        while True:
            out.append(sock.recv(4096).decode())
            sock.settimeout(0.05)
    except socket.timeout:
        return out


def until_notified(sock: socket.socket, text: str, timeout: float = 30) -> bool:
    return bool(wait_for(lambda: any(text in m for m in notifications(sock, 1)), timeout=timeout, interval=0))


def test_daemon_survives_the_bus_dying_and_converges(lab: Lab) -> None:
    w = World(lab, hook=False)  # the daemon alone: nothing else can apply a policy
    sock = None
    try:
        w.nm.seed_keyfiles(user_service=SEED)
        w.nm.up("mgmt")
        sock = start_watched_daemon(w, watchdog_usec=2_000_000)  # WATCHDOG=1 every second
        assert until_notified(sock, "READY=1"), w.daemon_tail()
        assert until_notified(sock, "WATCHDOG=1"), w.daemon_tail()
        w.nm.up("service")
        assert w.wait_rules(seed_rule), w.daemon_tail()
        w.nm.down("service")
        assert w.wait_rules(lambda rules: not rules), w.daemon_tail()

        w.nm.kill_bus()
        assert wait_for(lambda: "lost the connection to the D-Bus system bus" in w.daemon_tail(50), timeout=30), \
            f"the daemon did not notice: {w.daemon_tail()}"
        assert w.daemon.poll() is None, w.daemon_tail()
        lock, daemon_lock = (os.path.join(w.state_dir, name) for name in ("lock", "daemon.lock"))
        # (a job that started before the bus went may still be finishing: seconds, not the outage)
        assert wait_for(lambda: not _held(lock), timeout=5), "the reconcile lock is held while the bus is gone"
        assert wait_for(lambda: not _held(daemon_lock), timeout=5), \
            "the hook is still told to step aside while the daemon cannot follow"
        notifications(sock, 0.1)  # drain
        dead = notifications(sock, 4)  # four watchdog intervals without a bus
        assert not [m for m in dead if "WATCHDOG=1" in m], dead

        w.nm.restart_bus_and_nm()
        assert wait_for(lambda: "connected to the D-Bus system bus again" in w.daemon_tail(80), timeout=30), \
            w.daemon_tail()
        assert until_notified(sock, "WATCHDOG=1"), w.daemon_tail()
        assert wait_for(lambda: _held(daemon_lock), timeout=10)
        w.nm.up("service")
        assert w.wait_rules(seed_rule), f"no policy for a connection up after the bus came back: {w.daemon_tail()}"
        assert wait_for(lambda: w.seed.tcp(Seed.SERVICE4), timeout=10)
        assert w.daemon.poll() is None
    finally:
        print(w.daemon_tail(60))
        if sock is not None:
            sock.close()
        w.close()


def test_a_hung_bus_times_out_and_the_daemon_follows_again(lab: Lab) -> None:
    w = World(lab, hook=False)
    sock = None
    try:
        w.nm.seed_keyfiles(user_service=SEED)
        w.nm.up("mgmt")
        sock = start_watched_daemon(w, watchdog_usec=2_000_000)
        assert until_notified(sock, "WATCHDOG=1"), w.daemon_tail()
        w.nm.freeze_bus()
        try:
            assert wait_for(lambda: "does not answer" in w.daemon_tail(50), timeout=30), w.daemon_tail()
            notifications(sock, 0.1)
            dead = notifications(sock, 4)
            assert not [m for m in dead if "WATCHDOG=1" in m], dead
            assert not _held(os.path.join(w.state_dir, "daemon.lock"))
            apply = w.cli("apply")  # a bounded wait, a clear message, the recorded connections re-applied
            assert apply.returncode == 0, apply.stderr
            assert "did not answer" in apply.stderr and "re-applying the connections recorded" in apply.stderr, \
                apply.stderr
        finally:
            w.nm.freeze_bus(False)
        assert until_notified(sock, "WATCHDOG=1"), w.daemon_tail()
        w.nm.up("service")
        assert w.wait_rules(seed_rule), w.daemon_tail()
        assert w.daemon.poll() is None
    finally:
        print(w.daemon_tail(60))
        if sock is not None:
            sock.close()
        w.close()


# ---- 9: the CLI's snapshot and the hook's events --------------------------------


def _lock_waiters(path: str) -> bool:
    """Is a process blocked waiting for the flock on ``path``? (/proc/locks marks waiters '->')"""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as handle:
        return any("->" in line and f":{inode} " in line for line in handle)


@pytest.mark.parametrize("event", ["up", "down"])
def test_an_event_between_the_cli_read_and_its_reconcile_is_not_undone(hooked: World, event: str) -> None:
    w = hooked
    marker = os.path.join(w.base, "events")
    script = os.path.join(w.nm.dispatcher_dir, "90-test-marker")  # runs after our hook, per event
    with open(script, "w") as handle:
        handle.write(f'#!/bin/sh\necho "$1 $2" >>{marker}\n')
    os.chmod(script, 0o755)
    open(marker, "a").close()
    if event == "down":
        w.nm.up("service")
        assert w.wait_rules(seed_rule)

    def handled() -> bool:
        """Our hook is done with the event on eth1 (the marker runs after it, for the same event)."""
        with open(marker) as events:
            return f"eth1 {event}" in events.read().splitlines()

    go = os.path.join(w.base, "go")
    env = dict(w.cli_env(), NM_POLICY_ROUTING_PAUSE_AT=f"apply-snapshot:{go}")
    cli = subprocess.Popen(["ip", "netns", "exec", w.host.name, CLI, "apply"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    nmcli = None
    try:
        assert wait_for(lambda: os.path.exists(go + ".paused") or cli.poll() is not None, timeout=30)
        assert cli.poll() is None, cli.communicate()
        nmcli = subprocess.Popen(["ip", "netns", "exec", w.host.name, "nmcli", "--wait", "30", "connection",
                                  event, "service"], env=w.nm.env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        lock = os.path.join(w.state_dir, "lock")
        # the hook handled the event meanwhile, or waits for the lock the CLI holds
        assert wait_for(lambda: handled() or _lock_waiters(lock), timeout=30, interval=0.02)
    finally:
        open(go, "w").close()
        out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, f"apply failed (it acted on a stale snapshot): {err}"
    assert nmcli.wait(60) == 0, nmcli.communicate()
    assert wait_for(handled, timeout=30)
    rules = w.our_rules()
    if event == "up":
        assert seed_rule(rules), (f"the CLI undid the hook's up: {rules}\n{out}{err}\n"
                                  + w.cli("status", "-v").stdout + w.nm.log_tail(w.nm.dispatcher_log, 60))
    else:
        assert not rules, f"the CLI undid the hook's down: {rules}\n{out}{err}"
