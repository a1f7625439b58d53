"""Benchmark: memory and start-up. The daemon's RSS idle (real NetworkManager lab), and
``python -X importtime`` of the hook's path (the modules a dispatch imports)."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Dict, List, Tuple

from tests.lab.netns import Lab
from tests.lab.world import World

#: what a standalone event that reaches the engine imports (an 'up' with its policy remembered);
#: a stale event stops after syncbus
HOOK_PATH = ("import nm_policy_routing.cli, nm_policy_routing.journal, nm_policy_routing.dispatch, "
             "nm_policy_routing.adapters.syncbus, nm_policy_routing.reconcile, nm_policy_routing.adapters.kernel, "
             "nftables, nm_policy_routing.config")


def importtime() -> Tuple[float, List[Tuple[str, float]]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", HOOK_PATH], capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            rows.append((name, int(cumulative) / 1000))
    top = [(n.strip(), ms) for n, ms in rows if not n[1:].startswith(" ")]
    return sum(ms for _, ms in top), sorted(top, key=lambda r: -r[1])[:8]


def daemon_rss() -> Dict[str, float]:
    with Lab() as lab:
        world = World(lab, hook=False)
        try:
            world.nm.seed_keyfiles(user_service={"nm-policy-routing.enable": "yes"})
            world.nm.up("mgmt")
            world.nm.up("service")
            world.start_daemon()
            time.sleep(1)
            status = open(f"/proc/{world.daemon.pid}/status").read()
            rss = int(status.split("VmRSS:")[1].split()[0])
        finally:
            world.close()
    return {"daemon_rss_idle_mb": round(rss / 1024, 1)}


def main() -> None:
    total, top = importtime()
    print(f"hook path imports: {total:.0f} ms (python -X importtime, cumulative of top-level imports)")
    for name, ms in top:
        print(f"  {ms:7.1f} ms  {name}")
    print(daemon_rss())


if __name__ == "__main__":
    main()
