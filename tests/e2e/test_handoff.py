"""The hook hands events to the running daemon and waits for the verified result — real
NetworkManager, real dispatcher, real kernel."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Iterator

import pytest

from tests.lab.netns import Lab
from tests.lab.nm import SERVICE_UUID, service_keyfile
from tests.lab.world import HOOK, World

pytestmark = pytest.mark.nm

SEED_POLICY = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "100",
               "nm-policy-routing.fwmark": "0x1", "nm-policy-routing.priority": "1000"}
ACTIVATIONS = 50


@pytest.fixture
def world(lab: Lab) -> Iterator[World]:
    w = World(lab, hook=True)
    try:
        w.nm.seed_keyfiles(user_service=SEED_POLICY)
        w.nm.up("mgmt")
        w.start_daemon()
        yield w
    finally:
        print(w.daemon_tail())
        w.close()


def ask(world: World, line: bytes, user: int = 0) -> str:
    """Speak the handoff protocol as a process of ``user`` in the host namespace; its answer."""
    code = ("import os, socket, sys\n"
            "uid = int(sys.argv[2])\n"
            "if uid: os.setgid(uid); os.setuid(uid)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "try: s.sendall(sys.argv[3].encode('latin-1'))\n"
            "except BrokenPipeError: pass  # refused before it read\n"
            "print(s.makefile().read().strip())\n")
    sock = os.path.join(world.state_dir, "handoff.sock")
    proc = world.host.run(sys.executable, "-S", "-c", code, sock, str(user), line.decode("latin-1"), check=False)
    return proc.stdout.strip() or proc.stderr.strip()


def test_policy_in_kernel_before_activated_every_time(world: World) -> None:
    """Over 50 activations, a watcher on D-Bus and netlink sees our rule and table route before
    the connection's Connection.Active state becomes ACTIVATED."""
    seen = world.watch_activations(ACTIVATIONS)
    late = [a for a in seen if not (a["rule"] and a["route"])]
    leads = sorted(a["route_lead_ms"] for a in seen if a["route_lead_ms"] is not None)
    print(f"route in the kernel before ACTIVATED by (ms): min {leads[0] if leads else None}, "
          f"median {leads[len(leads) // 2] if leads else None}")
    assert len(seen) == ACTIVATIONS
    assert not late, f"{len(late)} of {ACTIVATIONS} activations reported ACTIVATED before our policy: {late[:3]}"
    assert not world.our_rules(), "a policy stayed after the last down"
    noise = [line for line in world.daemon_tail(1_000_000).splitlines() if line.startswith(("ERROR", "WARNING"))]
    assert not noise, f"{len(noise)} errors or warnings over {ACTIVATIONS} plain up/downs: {noise[:3]}"


def test_only_root_may_ask_and_a_forged_event_changes_nothing(world: World) -> None:
    sock = os.path.join(world.state_dir, "handoff.sock")
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    before = world.policy_state()
    assert "Permission denied" in ask(world, f"up\teth1\t{SERVICE_UUID}\n".encode(), user=65534)
    # past the file modes: the daemon's SO_PEERCRED check still refuses
    opened = [(path, os.stat(path).st_mode & 0o777) for path in (world.base, world.state_dir, sock)]
    try:
        for path, mode in opened:
            os.chmod(path, mode | 0o777 if path == sock else mode | 0o711)
        answer = ask(world, f"up\teth1\t{SERVICE_UUID}\n".encode(), user=65534)
    finally:
        for path, mode in opened:
            os.chmod(path, mode)
    assert answer.startswith("error not permitted"), answer
    # root, but 'service' is not active: the daemon asks NetworkManager and does nothing
    assert "stale" in ask(world, f"up\teth1\t{SERVICE_UUID}\n".encode())
    assert "stale" in ask(world, f"pre-up\teth0\t{SERVICE_UUID}\n".encode())
    assert ask(world, b"up\teth1\t../../etc\n").startswith("error malformed")
    assert ask(world, b"hostname\teth1\tx\n").startswith("error malformed")
    assert ask(world, b"up eth1\n").startswith("error malformed")
    assert world.policy_state() == before
    assert world.daemon.poll() is None, "the daemon died of a malformed request"


def test_a_hung_daemon_does_not_block_the_hook(world: World) -> None:
    """A stopped daemon: the hook gives up after its bound and acts itself."""
    world.nm.up("service")
    assert world.wait_rules(lambda rules: len(rules) == 1)
    time.sleep(1)  # let the daemon finish what the activation's signals asked for
    os.kill(world.daemon.pid, signal.SIGSTOP)
    try:
        world.cli("remove", "service", check=True)  # the CLI works without the daemon
        assert not world.our_rules()
        env = world.event_env(SERVICE_UUID)
        env["NM_POLICY_ROUTING_HANDOFF_SECONDS"] = "1"
        start = time.monotonic()
        proc = world.host.run(HOOK, "eth1", "up", env=env, check=False, timeout=60)
        took = time.monotonic() - start
        assert proc.returncode == 0
        assert "did not answer within 1 s" in proc.stderr
        assert len(world.our_rules()) == 1, f"the hook did not act itself ({took:.1f} s): {proc.stderr}"
    finally:
        os.kill(world.daemon.pid, signal.SIGCONT)


def test_a_handed_over_event_needs_no_round_trip_to_networkmanager(world: World) -> None:
    """The daemon answers from its mirror of NetworkManager's objects (kept by NetworkManager's
    signals) and the profile's remembered user data: with NetworkManager frozen, a handed-over
    pre-down and pre-up of the active connection still get their verified result, and the
    pre-up installs the policy with the connection's address and gateway."""
    world.nm.up("service")
    assert world.wait_rules(lambda rules: len(rules) == 1)
    time.sleep(1)  # let the daemon finish what the activation's signals asked for
    env = world.event_env(SERVICE_UUID)
    env["NM_POLICY_ROUTING_HANDOFF_SECONDS"] = "3"
    nm = world.nm.nm_pid
    os.kill(nm, signal.SIGSTOP)
    try:
        for action, rules in (("pre-down", 0), ("pre-up", 1)):
            proc = world.host.run(HOOK, "eth1", action, env=env, check=False, timeout=60)
            assert proc.returncode == 0 and not proc.stderr, f"{action}: {proc.stderr}"
            assert len(world.our_rules()) == rules, f"{action}: {world.daemon_tail()}"
        defaults = [r for r in world.our_routes() if r["dst"] == "default"]
        assert [(r.get("gateway"), r.get("prefsrc")) for r in defaults] == [("10.0.1.1", "10.0.1.2")], defaults
    finally:
        os.kill(nm, signal.SIGCONT)


def _tables(world: World) -> set:
    return {r.get("table") for r in world.our_rules()}


def test_an_edit_between_activations_is_the_policy_of_the_next_pre_up(world: World) -> None:
    """The daemon remembers each profile's user data between NetworkManager's edit signals: an
    edit made while the connection is down, right before ``nmcli connection up``, is what the
    next pre-up installs (pre-up blocks the activation: it is in the kernel when ``up`` returns),
    never the remembered policy."""
    world.nm.up("service")
    assert world.wait_rules(lambda rules: len(rules) == 1)
    assert _tables(world) == {"100"}
    for table in ("200", "300"):
        world.nm.down("service")
        assert world.wait_rules(lambda rules: not rules)
        assert world.set_user_data_unchecked(SERVICE_UUID, {**SEED_POLICY, "nm-policy-routing.table": table})
        world.nm.up("service")
        assert _tables(world) == {table}, world.daemon_tail()


def test_a_profile_deleted_and_added_again_with_its_uuid_gets_its_new_policy(world: World) -> None:
    world.nm.up("service")
    assert world.wait_rules(lambda rules: len(rules) == 1)
    world.nm.nmcli("connection", "delete", "uuid", SERVICE_UUID)
    assert world.wait_rules(lambda rules: not rules)
    world.nm.write_keyfile("service", service_keyfile({**SEED_POLICY, "nm-policy-routing.table": "400"}))
    world.nm.up("service")
    assert _tables(world) == {"400"}, world.daemon_tail()
