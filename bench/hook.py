"""Benchmark: the dispatcher hook's wall time per event, beside a hand-written shell hook.

(a) our hook standalone (it reconciles), (b) our hook with the daemon running (it hands
the event over and waits for the verified result), baseline: bench/seed_hook.sh doing
the seed's commands. Each hook runs inside the host namespace of a lab with a real
NetworkManager, with the environment NetworkManager's dispatcher gives an event of
'service': ``pre-up`` (installs), ``up`` (verifies), ``pre-down`` (removes), ``down``
(NetworkManager still reports 'service' active, so a stale ``down``: nothing to remove).
Then, hook installed and daemon running, 100 real activations: a watcher on D-Bus and
netlink (tests/lab/activation_watch.py) sees whether our rule and route were in the
kernel before NetworkManager reported ACTIVATED, and how long after it they came if not;
and the old measure, ``nmcli connection up`` returning -> our rule in the kernel.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Dict, List

from tests.lab.netns import Lab, wait_for
from tests.lab.nm import SERVICE_UUID
from tests.lab.world import HOOK, World, install_hook

ACTIONS = ("pre-up", "up", "pre-down", "down")

HERE = os.path.dirname(os.path.abspath(__file__))
POLICY = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "100",
          "nm-policy-routing.fwmark": "0x1", "nm-policy-routing.priority": "1000"}


def event_env(world: World) -> Dict[str, str]:
    env = world.cli_env()
    env.update(CONNECTION_UUID=SERVICE_UUID, CONNECTION_ID="service", DEVICE_IFACE="eth1",
               DEVICE_IP_IFACE="eth1", IP4_NUM_ADDRESSES="1", IP4_ADDRESS_0="10.0.1.2/24 10.0.1.1",
               IP4_GATEWAY="10.0.1.1", IP6_NUM_ADDRESSES="1", IP6_ADDRESS_0="fd00:1::2/64 fd00:1::1",
               IP6_GATEWAY="fd00:1::1")
    return env


def time_hook(world: World, hook: str, count: int, actions=("up", "down")) -> Dict[str, List[float]]:
    proc = world.host.run(sys.executable, os.path.join(HERE, "time_hook.py"), hook, str(count), *actions,
                          env=event_env(world), timeout=600)
    return json.loads(proc.stdout)


def median_ms(values: List[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def p99_ms(values: List[float]) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1)


def daemon_delay(world: World, count: int) -> List[float]:
    """From `nmcli connection up` returning to our rule in the kernel (polled every 1 ms)."""
    delays = []
    for _ in range(count):
        world.nm.up("service")
        start = time.perf_counter()
        wait_for(lambda: world.our_rules(), timeout=10, interval=0.001)
        delays.append(time.perf_counter() - start)
        world.nm.down("service")
        wait_for(lambda: not world.our_rules(), timeout=10, interval=0.005)
    return delays


def run(count: int = 20, activation_count: int = 100) -> Dict[str, Dict[str, float]]:
    results: Dict[str, Dict[str, float]] = {}
    with Lab() as lab:
        world = World(lab, hook=False)
        try:
            world.nm.seed_keyfiles(user_service=POLICY)
            world.nm.up("mgmt")
            world.nm.up("service")
            base = time_hook(world, os.path.join(HERE, "seed_hook.sh"), count)
            ours = time_hook(world, HOOK, count, ACTIONS)
            world.start_daemon()
            with_daemon = time_hook(world, HOOK, count, ACTIONS)
            for action in ACTIONS:
                shell = median_ms(base["up" if "up" in action else "down"])
                results[f"hook {action}, standalone"] = {"ms": median_ms(ours[action]), "baseline_ms": shell}
                results[f"hook {action}, daemon running"] = {"ms": median_ms(with_daemon[action]),
                                                             "baseline_ms": shell}
            world.nm.down("service")
            install_hook(world.nm.dispatcher_dir)
            seen = world.watch_activations(activation_count)
            after = [0.0 if a["rule"] and a["route"] else (a["late_ms"] / 1000 if a["late_ms"] is not None
                                                           else float("inf")) for a in seen]
            results["activation -> verified kernel state, p50"] = {"ms": median_ms(after), "baseline_ms": None}
            results["activation -> verified kernel state, p99"] = {"ms": p99_ms(after), "baseline_ms": None}
            results["policy in the kernel before ACTIVATED"] = {
                "ms": sum(1 for a in seen if a["rule"] and a["route"]), "baseline_ms": None, "of": len(seen)}
            delays = daemon_delay(world, activation_count)
            results["daemon: nmcli up -> rule in kernel, p50"] = {"ms": median_ms(delays), "baseline_ms": None}
            results["daemon: nmcli up -> rule in kernel, p99"] = {"ms": p99_ms(delays), "baseline_ms": None}
        finally:
            world.close()
    return results


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    results = run(count, int(sys.argv[2]) if len(sys.argv) > 2 else 100)
    print(f"{'measure':<44} {'ratio':>6} {'ours ms':>8} {'baseline ms':>12}")
    for name, row in results.items():
        ratio = f"{row['ms'] / row['baseline_ms']:.2f}" if row["baseline_ms"] else "-"
        print(f"{name:<44} {ratio:>6} {row['ms']:>8} {row['baseline_ms'] if row['baseline_ms'] else '-':>12}")
    with open(os.path.join(HERE, "hook.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
