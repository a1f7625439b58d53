"""Benchmark: the packet path. iperf3 TCP bulk and 64-byte UDP packets/s from a client to
the host's service address, with the policy active, with no policy, and with conntrack
alone (a table that only makes conntrack track the flows), all in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Dict

from tests.lab.netns import Lab, wait_for

CONNTRACK_ONLY = ("nft add table inet ctonly; "
                  "nft add chain inet ctonly pre '{ type filter hook prerouting priority mangle; }'; "
                  "nft add rule inet ctonly pre ct state established counter")


def iperf(client, server_addr: str, udp: bool, seconds: int) -> float:
    args = ["iperf3", "-c", server_addr, "-t", str(seconds), "-J"]
    if udp:
        args += ["-u", "-l", "64", "-b", "0"]
    out = json.loads(client.run(*args, timeout=seconds + 30).stdout)
    end = out["end"]
    if udp:
        summary = end["sum"]
        return summary["packets"] / summary["seconds"] * (1 - summary.get("lost_percent", 0) / 100)
    return end["sum_received"]["bits_per_second"] / 1e9


def run(seconds: int = 5, repeats: int = 3) -> Dict[str, Dict[str, float]]:
    results: Dict[str, Dict[str, float]] = {}
    with Lab() as lab:
        client, host = lab.ns("cli"), lab.ns("host")
        lab.link(client, "c0", host, "eth1")
        client.ip("addr", "add", "10.0.1.1/24", "dev", "c0")
        host.ip("addr", "add", "10.0.1.2/24", "dev", "eth1")
        host.ip("route", "add", "default", "via", "10.0.1.1")
        server = subprocess.Popen(["ip", "netns", "exec", host.name, "iperf3", "-s"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: client.run("iperf3", "-c", "10.0.1.2", "-t", "1", check=False).returncode == 0,
                     timeout=10, interval=0.2)
            state = tempfile.mkdtemp(prefix="npr-bench-")
            modes = {
                "no policy": lambda: None,
                "conntrack only": lambda: host.sh(CONNTRACK_ONLY),
                "policy": lambda: apply_policy(host, state),
            }
            samples: Dict[str, Dict[str, list]] = {m: {"tcp": [], "udp": []} for m in modes}
            for _ in range(repeats):  # interleave the modes so drift in the machine hits all alike
                for mode, setup in modes.items():
                    reset(host, state)
                    setup()
                    samples[mode]["tcp"].append(iperf(client, "10.0.1.2", False, seconds))
                    samples[mode]["udp"].append(iperf(client, "10.0.1.2", True, seconds))
            reset(host, state)
        finally:
            server.kill()
            server.wait()
    for mode, values in samples.items():
        results[mode] = {k: sorted(v)[len(v) // 2] for k, v in values.items()}
    return results


def apply_policy(host, state: str) -> None:
    code = ("import sys; from nm_policy_routing.reconcile import Engine; "
            "from nm_policy_routing.model import Address, Connection; "
            "Engine(sys.argv[1]).reconcile([Connection('u1', 'svc', 'eth1', (Address('10.0.1.2', 24),), "
            "'10.0.1.1', None, (('nm-policy-routing.enable', 'yes'), ('nm-policy-routing.table', '100'), "
            "('nm-policy-routing.fwmark', '0x1')))])")
    host.run(sys.executable, "-c", code, state)


def reset(host, state: str) -> None:
    host.sh("nft delete table inet ctonly 2>/dev/null; conntrack -F 2>/dev/null; true")
    code = "import sys; from nm_policy_routing.reconcile import Engine; Engine(sys.argv[1]).flush()"
    host.run(sys.executable, "-c", code, state)


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    results = run(seconds)
    base = results["no policy"]
    print(f"{'mode':<16} {'TCP ratio':>9} {'TCP Gbit/s':>10} {'UDP ratio':>9} {'UDP pkt/s':>10}")
    for mode, r in results.items():
        print(f"{mode:<16} {r['tcp'] / base['tcp']:>9.3f} {r['tcp']:>10.2f} {r['udp'] / base['udp']:>9.3f} "
              f"{r['udp']:>10.0f}")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "packet.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
