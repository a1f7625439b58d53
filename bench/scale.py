"""Benchmark: N = 1, 16, 64, 256 policy connections on veth links in a namespace.

Reconcile all from scratch (baseline: the same objects by one `ip -batch` + one
`nft -f`, the physical floor), and one more connection's up and down while N are
active (the engine in-process, as the daemon runs it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Dict, List

from tests.lab.netns import Lab

HERE = os.path.dirname(os.path.abspath(__file__))


def build(lab: Lab, n: int):
    host, peer = lab.ns("host"), lab.ns("peer")
    script = []
    for i in range(n + 1):
        a, b = divmod(i, 250)
        script += [f"link add v{i} type veth peer name p{i} netns {peer.name}",
                   f"link set v{i} up", f"addr add 10.{100 + a}.{b}.2/24 dev v{i}"]
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write("\n".join(script) + "\n")
    host.run("ip", "-batch", f.name)
    os.unlink(f.name)
    peer.sh(f"for i in $(seq 0 {n}); do ip link set p$i up; done")
    return host


def run(sizes: List[int]) -> Dict[str, Dict[str, float]]:
    results = {}
    for n in sizes:
        with Lab() as lab:
            host = build(lab, n)
            state = tempfile.mkdtemp(prefix="npr-bench-")
            proc = host.run(sys.executable, os.path.join(HERE, "scale_worker.py"), str(n), state, timeout=900)
            results[str(n)] = json.loads(proc.stdout)
    return results


def main() -> None:
    sizes = [int(s) for s in sys.argv[1:]] or [1, 16, 64, 256]
    results = run(sizes)
    print(f"{'N':>4} {'scratch/floor':>13} {'scratch ms':>10} {'floor ms':>9} {'up ms':>7} {'down ms':>8} "
          f"{'up vs N=1':>9}")
    one = results.get("1") or next(iter(results.values()))
    for n, r in results.items():
        print(f"{n:>4} {r['scratch_s'] / r['floor_s']:>13.2f} {r['scratch_s'] * 1000:>10.1f} "
              f"{r['floor_s'] * 1000:>9.1f} {r['one_up_s'] * 1000:>7.1f} {r['one_down_s'] * 1000:>8.1f} "
              f"{r['one_up_s'] / one['one_up_s']:>9.2f}")
    with open(os.path.join(HERE, "scale.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
