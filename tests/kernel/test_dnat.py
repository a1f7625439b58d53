"""A service published by DNAT on a policy interface (Docker/Podman/libvirt style), for real.

The host publishes port 8080 of its service address (eth1) to a "container": a namespace
behind a bridge on the host, reached by a DNAT rule in an nft table of the test's own.
Strict rp_filter on the host (the seed's). Clients: the router (on eth1's subnet: served
without any policy) and the monitoring host (whose replies must come back by eth1).
"""

from __future__ import annotations

import pytest

from tests.conftest import connection
from tests.lab.netns import Lab, Netns, Seed, tcp_check

pytestmark = pytest.mark.kernel

SVC = "5e1f0000-0000-4000-8000-000000000001"
PORT = 8080
CTR4, CTR6 = "172.17.0.2", "fd00:17::2"


def publish(lab: Lab, seed: Seed) -> Netns:
    """A container namespace behind bridge br-ctr, port 8080 of the host published to it."""
    host, ctr = seed.host, lab.ns("ctr")
    host.ip("link", "add", "br-ctr", "type", "bridge")
    host.ip("link", "set", "br-ctr", "up")
    lab.link(host, "vctr", ctr, "eth0")
    host.ip("link", "set", "vctr", "master", "br-ctr")
    host.ip("addr", "add", "172.17.0.1/24", "dev", "br-ctr")
    host.ip("addr", "add", "fd00:17::1/64", "dev", "br-ctr", "nodad")
    ctr.ip("addr", "add", f"{CTR4}/24", "dev", "eth0")
    ctr.ip("addr", "add", f"{CTR6}/64", "dev", "eth0", "nodad")
    ctr.ip("route", "add", "default", "via", "172.17.0.1")
    ctr.ip("-6", "route", "add", "default", "via", "fd00:17::1")
    host.sysctl("net.ipv4.ip_forward", 1)
    host.sysctl("net.ipv6.conf.all.forwarding", 1)
    host.sh("nft add table inet published; "
            "nft add chain inet published pre '{ type nat hook prerouting priority dstnat; }'; "
            f"nft add rule inet published pre fib daddr type local tcp dport {PORT} dnat ip to {CTR4}; "
            f"nft add rule inet published pre fib daddr type local tcp dport {PORT} dnat ip6 to {CTR6}; "
            "nft add chain inet published post '{ type nat hook postrouting priority srcnat; }'; "
            "nft add rule inet published post oifname != br-ctr ip saddr 172.17.0.0/24 masquerade; "
            "nft add rule inet published post oifname != br-ctr ip6 saddr fd00:17::/64 masquerade")
    return ctr


def reaches(ctr: Netns, client: Netns, dst: str) -> bool:
    return tcp_check(ctr, client, dst, PORT)


@pytest.mark.parametrize("dst", [Seed.SERVICE4, Seed.SERVICE6], ids=["ipv4", "ipv6"])
def test_published_port_serves_old_clients_and_the_monitoring_host(lab: Lab, seed: Seed, engine,
                                                                  dst: str) -> None:
    ctr = publish(lab, seed)
    host = seed.host
    assert reaches(ctr, seed.rtr, dst), "the published port works without a policy"
    assert not reaches(ctr, seed.mon, dst), "the seed problem exists for the published port too"

    result = engine.reconcile(connection(SVC, "eth1", ["10.0.1.2/24", "fd00:1::2/64"], "10.0.1.1",
                                         "fd00:1::1", enable="yes", table="100", fwmark="0x1",
                                         priority="1000"))
    assert result["plans"][SVC]["status"] == "ok", result

    assert reaches(ctr, seed.rtr, dst), "a client served without the policy is still served"
    tx0, tx1 = host.counters("eth0")["tx"], host.counters("eth1")["tx"]
    assert reaches(ctr, seed.mon, dst), "the monitoring host reaches the published service"
    assert host.counters("eth1")["tx"] - tx1 >= 3, "the container's replies leave by eth1"
    assert host.counters("eth0")["tx"] - tx0 <= 1, "the container's replies do not leave by eth0"
    assert reaches(ctr, seed.rtr, dst) and reaches(ctr, seed.mon, dst)
    assert seed.tcp(dst), "the host's own service (the seed) still works"

    engine.remove(SVC)
    assert reaches(ctr, seed.rtr, dst)


@pytest.mark.parametrize("dst", ["10.0.1.1", "fd00:1::1"], ids=["ipv4", "ipv6"])
def test_container_connections_out_of_the_policy_interface(lab: Lab, seed: Seed, engine, dst: str) -> None:
    """The container's own connections leave eth1 masqueraded; their replies arrive on eth1
    addressed to the host (before de-masquerading), so they are marked: they must still
    be forwarded to the container."""
    ctr = publish(lab, seed)
    assert tcp_check(seed.rtr, ctr, dst, 8090), "the container reaches the router without a policy"
    result = engine.reconcile(connection(SVC, "eth1", ["10.0.1.2/24", "fd00:1::2/64"], "10.0.1.1",
                                         "fd00:1::1", enable="yes", table="100", fwmark="0x1",
                                         priority="1000"))
    assert result["plans"][SVC]["status"] == "ok", result
    assert tcp_check(seed.rtr, ctr, dst, 8090), "and with the policy"
