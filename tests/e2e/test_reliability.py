"""Reliability: faults mid-apply, drift repair, flap storms, hostile input, spoofed signals."""

from __future__ import annotations

import json
import threading
import time
from typing import Dict, Iterator, List

import pytest

from tests.lab.netns import Lab, Seed, wait_for
from tests.lab.nm import MGMT_UUID, SERVICE_UUID
from tests.lab.world import World
from tests.unit.test_policy import INVALID

pytestmark = pytest.mark.nm

RICH = {"nm-policy-routing.enable": "yes", "nm-policy-routing.match": "incoming,source,outgoing",
        "nm-policy-routing.rp-filter": "loose", "nm-policy-routing.routes": "192.0.2.0/24 via 10.0.1.254"}
MGMT = {"nm-policy-routing.enable": "yes", "nm-policy-routing.match": "incoming,source",
        "nm-policy-routing.table": "200", "nm-policy-routing.rp-filter": "loose",
        "nm-policy-routing.routes": "198.51.100.0/24 via 10.0.0.1"}
SEED = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "100",
        "nm-policy-routing.fwmark": "0x1", "nm-policy-routing.priority": "1000"}


def make_world(lab: Lab, hook: bool, service: Dict[str, str], mgmt: Dict[str, str] = None) -> World:
    w = World(lab, hook=hook)
    w.nm.seed_keyfiles(user_service=service, user_mgmt=mgmt)
    w.nm.up("mgmt")
    w.nm.up("service")
    return w


@pytest.fixture
def rich(lab: Lab) -> Iterator[World]:
    w = make_world(lab, False, RICH, MGMT)
    try:
        yield w
    finally:
        w.close()


def no_duplicates(world: World) -> bool:
    for family in ("-4", "-6"):
        rules = [json.dumps(r, sort_keys=True) for r in world.host.ipj(family, "rule")]
        if len(rules) != len(set(rules)):
            return False
    return True


def test_daemon_killed_at_twenty_points_converges_after_restart(rich: World) -> None:
    rich.start_daemon()
    reference = rich.policy_state()
    assert rich.our_rules(), "the policies apply"
    rich.stop_daemon()
    killed = 0
    for point in range(1, 21):
        assert rich.cli("flush").returncode == 0
        killed += rich.start_daemon_faulty(point)
        rich.start_daemon()
        state = rich.policy_state()
        assert state == reference, f"fault point {point}: not converged"
        assert no_duplicates(rich), f"fault point {point}: duplicate rule"
        rich.stop_daemon()
    assert killed == 20, f"only {killed} of 20 fault points were reached inside the apply"


def test_hook_killed_mid_run_converges_on_the_next_event(rich: World) -> None:
    assert rich.dispatch(SERVICE_UUID, "up").returncode == 0
    assert rich.dispatch(MGMT_UUID, "up", iface="eth0").returncode == 0
    reference = rich.policy_state()
    for point in (1, 2, 4, 7, 10, 13):
        assert rich.cli("flush").returncode == 0
        rich.dispatch(MGMT_UUID, "up", iface="eth0")
        proc = rich.dispatch(SERVICE_UUID, "up", {"NM_POLICY_ROUTING_FAULT_AT": str(point)})
        assert proc.returncode == -9, f"fault point {point} not reached: {proc.stderr[-500:]}"
        rich.dispatch(SERVICE_UUID, "up")
        assert rich.policy_state() == reference, f"fault point {point}"
        assert no_duplicates(rich)


def repair_delay(world: World, damage: str, present) -> float:
    start = time.monotonic()
    world.host.sh(damage)
    assert wait_for(present, timeout=10, interval=0.01), f"not repaired after {damage!r}: {world.daemon_tail()}"
    return time.monotonic() - start


def test_drift_is_repaired_by_the_daemon(lab: Lab) -> None:
    w = make_world(lab, False, SEED)
    try:
        w.start_daemon()
        assert w.wait_rules(lambda rules: len(rules) == 1)
        applied = w.policy_state()
        flush = repair_delay(w, "nft flush ruleset", w.has_nft)
        same = wait_for(lambda: w.policy_state() == applied, timeout=5)
        now = w.policy_state()
        assert same, {k: (applied[k], now[k]) for k in now if now[k] != applied[k]}
        rule = repair_delay(w, "ip rule del priority 1000 fwmark 0x1 table 100",
                            lambda: len(w.our_rules()) == 1)
        assert wait_for(lambda: w.policy_state() == applied, timeout=5)
        route = repair_delay(w, "ip route flush table 100", lambda: any(
            r["dst"] == "default" for r in w.our_routes()))
        assert wait_for(lambda: w.policy_state() == applied, timeout=5)
        print(f"repair delays: nft flush ruleset {flush * 1000:.0f} ms, deleted rule {rule * 1000:.0f} ms, "
              f"flushed table {route * 1000:.0f} ms")
        assert w.seed.tcp(Seed.SERVICE4)
    finally:
        w.close()


def test_flap_storm_with_policy_edits(lab: Lab) -> None:
    w = make_world(lab, True, SEED)
    try:
        w.start_daemon()
        w.nm.down("service")
        assert wait_for(lambda: not w.our_rules(), timeout=10)
        baseline = w.policy_state()
        seen_duplicate: List[str] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                if not no_duplicates(w):
                    seen_duplicate.append(time.ctime())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for cycle in range(300):
                if cycle % 30 == 0:  # a policy edit through NetworkManager, mid-storm
                    table = "100" if cycle % 60 else "101"
                    assert w.cli("set", "service", "table", table).returncode == 0
                w.nm.up("service")
                w.nm.down("service")
        finally:
            stop.set()
            watcher.join()
        assert not seen_duplicate, f"duplicate rules seen at {seen_duplicate[:3]}"
        assert wait_for(lambda: w.policy_state() == baseline, timeout=15)
    finally:
        w.close()


# D-Bus strings cannot carry a NUL (the bus drops the sender): such values never reach us
HOSTILE = [(f"nm-policy-routing.{key}", value) for key, value, _ in INVALID if "\x00" not in value] + [
    ("nm-policy-routing.table", "100\r"),
    ("nm-policy-routing.table", "\x07\x1b[31m"),
    ("nm-policy-routing.table", "; ip rule flush"),
    ("nm-policy-routing.routes", "0.0.0.0/0 via 10.0.1.1; reboot"),
    ("nm-policy-routing.routes", "10.0.0.0/8 via $(id)"),
    ("nm-policy-routing.match", "incoming\tsource"),
    ("nm-policy-routing.fwmark", "0x1/0x1 || true"),
    ("nm-policy-routing.family", "../../../../proc/sys/net/ipv4/ip_forward"),
    ("nm-policy-routing.rp-filter", "strict\nnm-policy-routing.table=254"),
    ("nm-policy-routing.priority", "1" * 8000),
    ("nm-policy-routing.Table", "100"),
    ("nm-policy-routing.TABLE", "100"),
    ("NM-POLICY-ROUTING.table", "100"),
    ("nm-policy-routing.table.", "100"),
    ("nm-policy-routing.src_valid_mark", "yes"),
    ("nm-policy-routing.enable", "yes; reboot"),
    ("nm-policy-routing.table", "auto\x7f"),
    ("nm-policy-routing.match", "incoming\u202esource"),
    ("nm-policy-routing.routes", "10.9.0.0/16 via 10.0.1.1 dev lo"),
    ("nm-policy-routing.fwmark", "0xffffffff/0x0"),
]


def test_hostile_values_through_networkmanager(lab: Lab) -> None:
    w = make_world(lab, False, SEED, MGMT)
    reached = 0
    try:
        w.start_daemon()
        assert w.wait_rules(lambda rules: {"100", "200"} <= {r["table"] for r in rules})
        for key, value in HOSTILE:
            if not w.set_user_data_unchecked(SERVICE_UUID, {"nm-policy-routing.enable": "yes", key: value}):
                continue  # NetworkManager itself refuses it (a NUL, over 8 kB): it never reaches us
            reached += 1
            w.nm.up("service")  # raises unless NetworkManager activates it

            def service_error():
                rows = json.loads(w.cli("status", "--json").stdout or '{"connections": []}')["connections"]
                return [r for r in rows if r["uuid"] == SERVICE_UUID and r["status"] == "error"]

            rows = wait_for(service_error, timeout=10)
            assert rows, (key, value, w.cli("status").stdout)
            text = " ".join(rows[0]["errors"])
            shown = repr(value if len(value) <= 60 else value[:60] + "...")
            assert key in text and shown in text, (key, value, text)
            tables = {r["table"] for r in w.our_rules()}
            assert tables == {"200"}, (key, value, tables)  # mgmt's policy, untouched
            assert w.nm.device_state("eth1") == "connected"
        assert reached >= 60, f"only {reached} hostile values reached the policy parser"
    finally:
        w.close()


def daemon_bus_name(world: World) -> str:
    names = world.nm.run_in_host("dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                                 "/org/freedesktop/DBus", "org.freedesktop.DBus.ListNames").stdout
    for name in [n.split('"')[1] for n in names.splitlines() if 'string ":' in n]:
        pid = world.nm.run_in_host("dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                                   "/org/freedesktop/DBus", "org.freedesktop.DBus.GetConnectionUnixProcessID",
                                   f"string:{name}", check=False).stdout
        if pid and world.daemon and pid.split()[-1] == str(_python_child(world.daemon.pid)):
            return name
    raise AssertionError("the daemon is not on the bus")


def _python_child(pid: int) -> int:
    """`ip netns exec` execs the command: the PID is the daemon's own."""
    return pid


def test_spoofed_networkmanager_signal_changes_nothing(lab: Lab) -> None:
    w = make_world(lab, False, SEED)
    try:
        w.start_daemon()
        assert w.wait_rules(lambda rules: len(rules) == 1)
        for _ in range(10):  # drift that sends no notification, once the daemon is idle
            w.host.conf("ipv4", "eth1", "src_valid_mark", 0)
            time.sleep(1)
            if w.host.conf("ipv4", "eth1", "src_valid_mark") == 0:
                break
        target = daemon_bus_name(w)
        active = w.nm.nmcli("-g", "GENERAL.DBUS-PATH", "connection", "show", "service").stdout.strip()
        for member in ("Connection.Active.StateChanged uint32:2 uint32:0", "Settings.Connection.Updated"):
            name, *args = member.split()
            w.nm.run_in_host("dbus-send", "--system", "--type=signal", f"--dest={target}", active,
                             f"org.freedesktop.NetworkManager.{name}", *args)
        time.sleep(1.5)
        assert w.host.conf("ipv4", "eth1", "src_valid_mark") == 0, "a spoofed signal triggered work"
        assert "which is not NetworkManager" in w.daemon_tail(50)
        # the same kind of event from the real NetworkManager is acted on
        w.nm.nmcli("connection", "modify", "service", "connection.autoconnect-priority", "5")
        assert wait_for(lambda: w.host.conf("ipv4", "eth1", "src_valid_mark") == 1, timeout=10)
    finally:
        w.close()
