"""Benchmark: the dispatcher hook's wall time per event, beside a hand-written shell hook.

(a) our hook standalone (it reconciles), (b) our hook with the daemon running (it
returns at once), baseline: bench/seed_hook.sh doing the seed's commands. Each hook
runs inside the host namespace of a lab with a real NetworkManager, with the
environment NetworkManager's dispatcher gives an ``up``/``down`` of 'service'.
Also: the daemon's delay from ``nmcli connection up`` returning to verified kernel state.
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
from tests.lab.world import HOOK, World

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


def time_hook(world: World, hook: str, count: int) -> Dict[str, List[float]]:
    proc = world.host.run(sys.executable, os.path.join(HERE, "time_hook.py"), hook, str(count),
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


def run(count: int = 20, activations: int = 100) -> Dict[str, Dict[str, float]]:
    results: Dict[str, Dict[str, float]] = {}
    with Lab() as lab:
        world = World(lab, hook=False)
        try:
            world.nm.seed_keyfiles(user_service=POLICY)
            world.nm.up("mgmt")
            world.nm.up("service")
            base = time_hook(world, os.path.join(HERE, "seed_hook.sh"), count)
            ours = time_hook(world, HOOK, count)
            world.start_daemon()
            with_daemon = time_hook(world, HOOK, count)
            for action in ("up", "down"):
                results[f"hook {action}, standalone"] = {
                    "ms": median_ms(ours[action]), "baseline_ms": median_ms(base[action])}
                results[f"hook {action}, daemon running"] = {
                    "ms": median_ms(with_daemon[action]), "baseline_ms": median_ms(base[action])}
            world.nm.down("service")
            delays = daemon_delay(world, activations)
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
