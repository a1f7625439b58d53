"""``./run deb-test``'s VPN step: an OpenVPN connection with its own policy, on Debian 13's
NetworkManager (1.52) and network-manager-openvpn, applied by the installed hook alone.

The same scenario as tests/e2e/test_vpn.py (which runs it on this machine's NetworkManager,
hook and daemon): a client beyond the tunnel gets no answer without the policy and one
over tun0 with it; the seed policy on eth1 stays; ``nmcli connection down`` leaves the
kernel as before the VPN came up. It also checks what the installed package reads over
D-Bus for the VPN: its interface is tun0 (NetworkManager exports the tunnel's IP
configuration object for the VPN, the one tun0's device has), not the parent eth1.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict

from tests.lab.demo import say, show, verdict
from tests.lab.netns import Seed, wait_for
from tests.lab.nm import NMLab
from tests.lab.vpn import TUNNEL_CLIENT, VPN_POLICY, VPN_UUID, VpnServer

FACTS = (
    "import asyncio, json\n"
    "from nm_policy_routing.adapters.networkmanager import NetworkManagerBus\n"
    "async def go():\n"
    "    nm = await NetworkManagerBus().connect()\n"
    "    for path in await nm.active_paths():\n"
    "        found = await nm.facts(path)\n"
    "        if found and found[0].uuid == %r:\n"
    "            c = found[0]\n"
    "            print(json.dumps([c.iface, [a.ip for a in c.addresses], c.gateway4]))\n"
    "asyncio.run(go())\n" % VPN_UUID)


def vpn_step(nm: NMLab, seed: Seed, ours: Callable[[NMLab], Dict[str, Any]],
             seed_applied: Callable[[Dict[str, Any]], bool]) -> bool:
    """Play the VPN scenario; True if every check passed. The seed policy must be applied."""
    server = VpnServer(seed.lab, seed, os.path.join(nm.base, "vpn"))
    try:
        server.start()
        return _play(nm, seed, server, ours, seed_applied)
    finally:
        server.stop()


def _kernel(nm: NMLab, ours: Callable[[NMLab], Dict[str, Any]]) -> Dict[str, Any]:
    state = ours(nm)
    state["nft_text"] = nm.run_in_host("nft", "list", "table", "inet", "nm_policy_routing", check=False).stdout
    return state


def _play(nm: NMLab, seed: Seed, server: VpnServer, ours, seed_applied) -> bool:
    host = seed.host
    say("An OpenVPN connection (never-default, pushed routes ignored) beside the seed's policy")
    nm.write_keyfile("vpn", server.keyfile())
    before = _kernel(nm, ours)
    nm.up("vpn")
    ok = verdict("without a policy: ping from beyond the tunnel fails", not server.ping())
    ok = verdict("without a policy: TCP from beyond the tunnel fails", not server.tcp()) and ok
    nm.down("vpn")
    server.tunnel_gone()

    nm.write_keyfile("vpn", server.keyfile(VPN_POLICY))
    nm.up("vpn")
    version = nm.nmcli("--version").stdout.split()[-1]
    read = nm.run_in_host("python3", "-c", FACTS, check=False)
    facts = read.stdout.strip()
    show(f"NetworkManager {version}: [interface, addresses, gateway] of the VPN as the installed package "
         "reads them over D-Bus", facts + read.stderr)
    try:
        iface, addresses, gateway = json.loads(facts)
    except ValueError:
        iface, addresses, gateway = None, [], None
    ok = verdict("D-Bus: the VPN's interface is tun0, address 10.8.0.2, no gateway",
                 iface == "tun0" and TUNNEL_CLIENT in addresses and gateway is None) and ok

    def vpn_applied() -> bool:
        return any(r.get("priority") == 1300 and str(r.get("table")) == "300" for r in ours(nm)["rules"])

    ok = verdict("vpn-up: the hook applied rule 1300 -> table 300", bool(wait_for(vpn_applied, 15))) and ok
    table = host.run("ip", "route", "show", "table", "300", check=False).stdout.strip()
    show("ip route show table 300:", table)
    ok = verdict("table 300: the tunnel's prefix and an on-link default via tun0",
                 f"default dev tun0 proto 214 scope link src {TUNNEL_CLIENT}" in table
                 and "10.8.0.0/24 dev tun0" in table) and ok
    ok = verdict("net.ipv4.conf.tun0.src_valid_mark = 1", host.conf("ipv4", "tun0", "src_valid_mark") == 1) and ok
    sent = host.counters("tun0")["tx"]
    ok = verdict("with the policy: ping from beyond the tunnel works", bool(wait_for(server.ping, 5))) and ok
    ok = verdict("with the policy: TCP from beyond the tunnel works", server.tcp()) and ok
    ok = verdict("the replies left by tun0 (its tx counter)", host.counters("tun0")["tx"] - sent >= 4) and ok
    ok = verdict("the seed policy on eth1 stays applied", seed_applied(ours(nm))) and ok
    ok = verdict("the monitoring host still gets TCP answers", seed.tcp(Seed.SERVICE4)) and ok
    status = nm.run_in_host("nm-policy-routing", "status", check=False).stdout
    show("$ nm-policy-routing status", status)
    ok = verdict("status: 'vpn' applied on tun0", any(
        "vpn" in line and "tun0" in line and "applied" in line for line in status.splitlines())) and ok

    nm.down("vpn")
    ok = verdict("vpn-down: the kernel holds what it held before the VPN came up",
                 bool(wait_for(lambda: _kernel(nm, ours) == before, 15))) and ok
    server.tunnel_gone()
    return ok
