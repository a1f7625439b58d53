"""Runs inside the bench namespace: time the engine for N connections (in-process, like the daemon:
its resident kernel, its imports, its mirror of NetworkManager's objects).

usage: scale_worker.py N STATE_DIR  -> JSON on stdout
(NPR_PROFILE=PATH: the first from-scratch reconcile is profiled with cProfile into PATH.N)
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import nm_policy_routing.daemon  # noqa: F401  (the daemon's imports, for a representative RSS)
from nm_policy_routing.adapters.nmfacts import ACTIVE, DEVICE, IP4CONFIG, IP6CONFIG, NM
from nm_policy_routing.adapters.nmmirror import Mirror
from nm_policy_routing.adapters.resident import Resident, trim_heap
from nm_policy_routing.model import Address, Connection
from nm_policy_routing.reconcile import Engine
from nm_policy_routing.scoped import Scoped

#: the floor and the from-scratch reconcile are each timed this many times (medians)
REPEATS = 3


def conn(i: int) -> Connection:
    """Policy connection i: incoming marking with its own mark (the automatic mark bits
    hold 255 connections; the benchmark goes past that with explicit marks)."""
    a, b = divmod(i, 250)
    policy = (("nm-policy-routing.enable", "yes"), ("nm-policy-routing.fwmark", f"0x{i + 1:x}/0xfff"))
    return Connection(uuid=f"00000000-0000-4000-8000-{i:012d}", id=f"c{i}", iface=f"v{i}",
                      addresses=(Address(f"10.{100 + a}.{b}.2", 24),), gateway4=f"10.{100 + a}.{b}.1",
                      user_data=policy)


def nm_mirror(n: int) -> Mirror:
    """The daemon's mirror of NetworkManager's objects (nmmirror.py), loaded as GetManagedObjects
    would: for each connection its device, active connection and two IP configurations."""
    nm = "/org/freedesktop/NetworkManager"
    objects = {nm: {NM: {"ActiveConnections": [f"{nm}/ActiveConnection/{i}" for i in range(n)],
                         "Devices": [f"{nm}/Devices/{i}" for i in range(n)], "Startup": False}}}
    for i in range(n):
        c = conn(i)
        device, active = f"{nm}/Devices/{i}", f"{nm}/ActiveConnection/{i}"
        ip4, ip6 = f"{nm}/IP4Config/{i}", f"{nm}/IP6Config/{i}"
        objects[device] = {DEVICE: {"Interface": c.iface, "IpInterface": c.iface, "ActiveConnection": active,
                                    "Ip4Config": ip4, "Ip6Config": ip6, "Driver": "veth", "Mtu": 1500}}
        objects[active] = {ACTIVE: {"Uuid": c.uuid, "Id": c.id, "State": 2, "StateFlags": 0, "Type": "802-3-ethernet",
                                    "Vpn": False, "Devices": [device], "Ip4Config": ip4, "Ip6Config": ip6,
                                    "Connection": f"{nm}/Settings/{i}", "Default": False}}
        objects[ip4] = {IP4CONFIG: {"AddressData": [{"address": c.addresses[0].ip, "prefix": 24}],
                                    "Gateway": c.gateway4, "RouteData": []}}
        objects[ip6] = {IP6CONFIG: {"AddressData": [{"address": f"fd00:{i:x}::2", "prefix": 64}],
                                    "Gateway": f"fd00:{i:x}::1", "RouteData": []}}
    mirror = Mirror(lambda value: value)
    mirror.expect(1)
    mirror.on_message(SimpleNamespace(reply_serial=1, error_name=None, sender=":1.1", body=[objects]))
    return mirror


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    n, state = int(sys.argv[1]), sys.argv[2]
    conns = [conn(i) for i in range(n)]
    extra = conn(n)
    out = {}
    # the floor: the same objects by one `ip -batch` and one `nft -f`
    dry = Engine(tempfile.mkdtemp(), dry_run=True).reconcile(conns).commands
    batches = {}
    for family in ("-4", "-6"):
        lines = [c[len(f"ip {family} "):] for c in dry if c.startswith(f"ip {family} ")]
        with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
            f.write("\n".join(lines) + "\n")
        batches[family] = f.name
    nft = [c for c in dry if c.startswith("nft ")]
    sysctls = [c.split()[-1].strip("'") for c in dry if c.startswith("sysctl ")]
    payload = nft[0].split("\n")[1] if nft else ""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as g:
        g.write(payload)
    # each key's value before the floor wrote it: put back after each floor, so that the engine
    # writes them too
    before = [f"{a.split('=')[0]}={open('/proc/sys/' + a.split('=')[0].replace('.', '/')).read().strip()}"
              for a in sysctls]

    def floor() -> None:
        for family, name in batches.items():
            subprocess.run(["ip", family, "-batch", name], check=True)
        subprocess.run(["nft", "-j", "-f", g.name], check=True)
        if sysctls:  # one sysctl process for all of them
            subprocess.run(["sysctl", "-qw", *sysctls], check=True)

    def undo_floor() -> None:
        subprocess.run("nft delete table inet nm_policy_routing; ip -4 rule flush protocol 214; "
                       "ip -4 route flush table all protocol 214; ip -6 rule flush protocol 214; "
                       "ip -6 route flush table all protocol 214", shell=True, check=True)
        if before:
            subprocess.run(["sysctl", "-qw", *before], check=True)

    # the floor and the engine from scratch alternate (this VM's timings drift): medians of REPEATS
    floors, scratches = [], []
    profile = os.environ.get("NPR_PROFILE")  # a path: cProfiles of the first from-scratch reconcile (PATH.N)
    # and of the one-connection ups and downs (PATH.N.one) go there
    for repeat in range(REPEATS):
        if repeat:  # the previous engine's policies go (not timed); a fresh engine starts from scratch
            engine.flush()
            resident.shutdown()
        floors.append(timed(floor))
        undo_floor()
        engine = Engine(tempfile.mkdtemp(prefix="npr-bench-", dir=os.path.dirname(state)) if repeat else state)
        resident = Resident()
        engine.keep_kernel(resident)  # as the daemon runs it: one kernel kept open across events
        if profile and not repeat:
            import cProfile

            profiler = cProfile.Profile()
            scratches.append(timed(lambda: profiler.runcall(engine.reconcile, conns)))
            profiler.dump_stats(f"{profile}.{n}")
        else:
            scratches.append(timed(lambda: engine.reconcile(conns)))
    out["floor_s"], out["scratch_s"] = statistics.median(floors), statistics.median(scratches)
    out["floor_samples_s"], out["scratch_samples_s"] = floors, scratches
    trim_heap()  # as the daemon does after a full re-sync
    ups, downs = [], []
    scoped = Scoped(engine)  # as the daemon acts on one connection's event: scoped, else the full reconcile
    fallbacks = []
    one = None
    if profile:  # and the one-connection events' (all ten ups and downs together)
        import cProfile

        one = cProfile.Profile()
    for _ in range(10):
        if one:
            one.enable()
        ups.append(timed(lambda: scoped.ensure(extra) or fallbacks.append("up") or engine.ensure(extra)))
        downs.append(timed(lambda: scoped.remove(extra.uuid) or fallbacks.append("down") or
                           engine.remove(extra.uuid)))
        if one:
            one.disable()
    if one:
        one.dump_stats(f"{profile}.{n}.one")
    out["full_reconcile_fallbacks"] = len(fallbacks)
    out["one_up_s"] = statistics.median(ups)
    out["one_down_s"] = statistics.median(downs)
    mirror = nm_mirror(n)  # what the daemon keeps of NetworkManager's objects for n connections
    out["rss_kb"] = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
    assert len(mirror) == 4 * n + 1
    engine.flush()
    for name in [*batches.values(), g.name]:
        os.unlink(name)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
