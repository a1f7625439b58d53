"""The benchmark suite: every figure beside its baseline and target; JSON in bench/results.json.

    sudo ./run bench           (about 5 minutes on 2 cores)
    sudo ./run bench --quick   (N=1 only, short runs: a smoke test)
"""

from __future__ import annotations

import json
import os
import sys
import time

from bench import hook, packet, scale, startup

HERE = os.path.dirname(os.path.abspath(__file__))


def row(name: str, value: float, unit: str, baseline=None, target: str = "", ok=None) -> dict:
    ratio = value / baseline if baseline else None
    return {"measure": name, "value": round(value, 3), "unit": unit, "baseline": baseline,
            "ratio": None if ratio is None else round(ratio, 3), "target": target, "met": ok}


def main() -> None:
    quick = "--quick" in sys.argv
    started = time.monotonic()
    rows = []
    h = hook.run(count=3 if quick else 20, activation_count=5 if quick else 100)
    for action in hook.ACTIONS:
        alone, shared = h[f"hook {action}, standalone"], h[f"hook {action}, daemon running"]
        rows.append(row(f"hook {action}, standalone", alone["ms"], "ms", alone["baseline_ms"], "<= 100 ms",
                        alone["ms"] <= 100))
        rows.append(row(f"hook {action}, daemon running (waits for the result)", shared["ms"], "ms",
                        shared["baseline_ms"], "<= 1.2x shell", shared["ms"] <= 1.2 * shared["baseline_ms"]))
    for q, limit in (("p50", 10), ("p99", 30)):
        value = h[f"activation -> verified kernel state, {q}"]["ms"]
        rows.append(row(f"activation -> verified kernel state, {q}", value, "ms", None, f"<= {limit} ms",
                        value <= limit))
    before = h["policy in the kernel before ACTIVATED"]
    rows.append(row(f"policy in the kernel before ACTIVATED (of {before['of']})", before["ms"], "times", None,
                    "every time", before["ms"] == before["of"]))
    for q in ("p50", "p99"):
        rows.append(row(f"daemon: nmcli up -> rule in kernel, {q}",
                        h[f"daemon: nmcli up -> rule in kernel, {q}"]["ms"], "ms"))
    sizes = [1] if quick else [1, 16, 64, 256]
    sc = scale.run(sizes)
    one = sc["1"]
    for n in sizes:
        r = sc[str(n)]
        rows.append(row(f"N={n}: reconcile all from scratch", r["scratch_s"] * 1000, "ms", r["floor_s"] * 1000,
                        "<= 3x ip -batch + nft -f" if n == 256 else "",
                        r["scratch_s"] <= 3 * r["floor_s"] if n == 256 else None))
        for what in ("up", "down"):
            value = r[f"one_{what}_s"] * 1000
            rows.append(row(f"N={n}: one more connection {what}", value, "ms", one[f"one_{what}_s"] * 1000,
                            "<= 10 ms and <= 1.5x N=1" if n == 256 else "",
                            value <= 10 and value <= 1500 * one[f"one_{what}_s"] if n == 256 else None))
        rows.append(row(f"N={n}: engine RSS (with the daemon's imports)", r["rss_kb"] / 1024, "MB", None,
                        "<= 50 MB" if n == 256 else "", r["rss_kb"] / 1024 <= 50 if n == 256 else None))
    p = packet.run(seconds=2 if quick else 5, repeats=1 if quick else 3)
    base = p["no policy"]
    for mode in ("policy", "conntrack only"):
        rows.append(row(f"TCP bulk, {mode}", p[mode]["tcp"], "Gbit/s", base["tcp"],
                        ">= 0.97x" if mode == "policy" else "", p[mode]["tcp"] >= 0.97 * base["tcp"]
                        if mode == "policy" else None))
        rows.append(row(f"UDP 64-byte, {mode}", p[mode]["udp"], "pkt/s", base["udp"],
                        ">= 0.85x" if mode == "policy" else "", p[mode]["udp"] >= 0.85 * base["udp"]
                        if mode == "policy" else None))
    total, top = startup.importtime()
    rows.append(row("hook path imports (python -X importtime)", total, "ms"))
    rows.append(row("daemon RSS, idle", startup.daemon_rss()["daemon_rss_idle_mb"], "MB"))
    print(f"{'measure':<44} {'ratio':>6} {'value':>10} {'unit':<7} {'baseline':>10}  target (met?)")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        base_text = f"{r['baseline']:.1f}" if r["baseline"] else "-"
        met = "" if r["met"] is None else (" yes" if r["met"] else " NO")
        print(f"{r['measure']:<44} {ratio:>6} {r['value']:>10.1f} {r['unit']:<7} {base_text:>10}  "
              f"{r['target']}{met}")
    print(f"suite time: {time.monotonic() - started:.0f} s")
    with open(os.path.join(HERE, "results.json"), "w") as handle:
        json.dump({"rows": rows, "import_top": top}, handle, indent=1)


if __name__ == "__main__":
    main()
