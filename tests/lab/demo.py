"""The README's demo: the seed scenario, played with a real NetworkManager in namespaces.

Run it with ``sudo ./run demo``. It never touches this machine's own network: the
host, the router and the monitoring host are network namespaces, NetworkManager runs
inside the host namespace on a private D-Bus bus, and all of it is removed at the end.
"""

from __future__ import annotations

import sys
import time

from tests.lab.netns import Lab, Seed, wait_for
from tests.lab.world import World

BOLD, GREEN, RED, DIM, END = ("\033[1m", "\033[32m", "\033[31m", "\033[2m", "\033[0m") \
    if sys.stdout.isatty() else ("",) * 5


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{END}", flush=True)


def show(title: str, text: str) -> None:
    print(f"{DIM}{title}{END}")
    for line in text.rstrip().splitlines() or ["(nothing)"]:
        print(f"    {line}")


def verdict(what: str, ok: bool) -> bool:
    print(f"  {what:<58} {GREEN + 'ok' if ok else RED + 'FAILS'}{END}", flush=True)
    return ok


def probe(seed: Seed) -> bool:
    results = [
        verdict(f"ping   monitoring host -> {Seed.SERVICE4} (eth1)", seed.ping(Seed.SERVICE4)),
        verdict(f"TCP    monitoring host -> {Seed.SERVICE4}:8021", seed.tcp(Seed.SERVICE4)),
        verdict(f"TCP    monitoring host -> [{Seed.SERVICE6}]:8021", seed.tcp(Seed.SERVICE6)),
    ]
    return all(results)


def installed(world: World) -> str:
    host = world.host
    ours = "\n".join(f"{family[1:]}: {line}" for family in ("-4", "-6")
                     for line in host.run("ip", family, "rule").stdout.splitlines()
                     if "proto 214" in line or "nm-policy" in line)
    table = host.run("ip", "route", "show", "table", "100", check=False).stdout.strip()
    nft = host.run("nft", "list", "table", "inet", "nm_policy_routing", check=False).stdout
    svm = host.conf("ipv4", "eth1", "src_valid_mark")
    return (f"ip rule (ours):\n{ours or '(none)'}\nip route show table 100:\n{table or '(none)'}\n"
            f"net.ipv4.conf.eth1.src_valid_mark = {svm}\n"
            f"nft table inet nm_policy_routing: {'present' if nft else 'absent'}")


def main() -> int:
    started = time.monotonic()
    say("Building the lab: network namespaces, a router that drops spoofed sources, "
        "and a real NetworkManager")
    with Lab() as lab:
        world = World(lab)
        try:
            return play(world, started)
        finally:
            world.close()


def play(world: World, started: float) -> int:
    seed, nm = world.seed, world.nm
    print("  monitoring host 10.0.9.2 --- router (strict rp_filter) --- eth0 10.0.0.2  host (mgmt)")
    print("                                                       \\---- eth1 10.0.1.2  host (service)")
    world.start_daemon()
    print(f"  NetworkManager {nm.nmcli('--version').stdout.split()[-1]} runs in {world.host.name}; "
          "the nm-policy-routing daemon and dispatcher hook are installed")
    nm.seed_keyfiles()
    nm.up("mgmt")
    nm.up("service")
    show("the host's main routing table (NetworkManager configured it):",
         world.host.run("ip", "route").stdout)

    say("Before: replies to the monitoring host leave by eth0 (its static route) and are dropped")
    if probe(seed):
        print(f"{RED}unexpected: the problem did not show{END}")
        return 1

    say("The user enables the policy on the 'service' connection")
    command = "nm-policy-routing set service enable yes table 100 fwmark 0x1 priority 1000"
    print(f"  $ {command}")
    out = world.cli(*command.split()[1:])
    show("", out.stdout + out.stderr)
    if out.returncode != 0:
        return 1
    wait_for(lambda: world.our_rules(), timeout=10)
    show("what is installed now:", installed(world))

    say("After: the replies leave by eth1, the interface the requests came in on")
    tx_before = world.host.counters("eth1")["tx"]
    ok = probe(seed)
    print(f"  packets sent by eth1 meanwhile: {world.host.counters('eth1')['tx'] - tx_before}")
    show("$ nm-policy-routing status", world.cli("status").stdout)

    say("The user takes the connection down: everything of the policy is removed")
    nm.down("service")
    clean = wait_for(lambda: not world.our_rules() and not world.has_nft(), timeout=10)
    show("what is installed now:", installed(world))
    ok = verdict("host clean (no rule, table or nft marking of ours)", bool(clean)) and ok

    say(f"Removing the lab ({time.monotonic() - started:.1f} s)")
    print(f"{GREEN}Demo passed.{END}" if ok else f"{RED}Demo FAILED.{END}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
