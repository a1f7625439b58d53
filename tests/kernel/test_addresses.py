"""Hosts as they are: several addresses in one prefix (SLAAC + privacy, a second IPv4
address) and interface names nft would not read literally."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile

import pytest

from tests.conftest import connection
from tests.lab.netns import Seed, tcp_check, wait_for

pytestmark = pytest.mark.kernel

SVC = "5e1f0000-0000-4000-8000-0000000000a1"
ODD = "5e1f0000-0000-4000-8000-0000000000a2"
ODD2 = "5e1f0000-0000-4000-8000-0000000000a3"
ODD3 = "5e1f0000-0000-4000-8000-0000000000a4"


def _global_addresses(ns, iface: str):
    out = []
    for link in ns.ipj("addr", "show", "dev", iface):
        for a in link.get("addr_info", []):
            if a.get("scope") == "global":
                out.append(a)
    return out


@pytest.fixture
def slaac(seed: Seed):
    """Router advertisements for fd00:1::/64 on the service link; the host takes SLAAC and
    privacy addresses there, beside its static fd00:1::2 and a second IPv4 address."""
    host, rtr = seed.host, seed.rtr
    host.conf("ipv6", "eth1", "accept_ra", 2)
    host.conf("ipv6", "eth1", "use_tempaddr", 2)
    host.conf("ipv6", "eth1", "autoconf", 1)
    host.ip("addr", "add", "10.0.1.3/24", "dev", "eth1")
    tmp = tempfile.mkdtemp(prefix="npr-ra-")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", rtr.name, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
         "--port=0", "--no-resolv", "--interface=r-svc", "--bind-interfaces", "--enable-ra",
         "--dhcp-range=::,constructor:r-svc,ra-only,64,10m", "--ra-param=r-svc,3",
         f"--pid-file={tmp}/pid", f"--dhcp-leasefile={tmp}/leases"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def two_more():  # a SLAAC (mngtmpaddr) and a temporary (privacy) address
            addrs = _global_addresses(host, "eth1")
            six = [a for a in addrs if a["family"] == "inet6" and not a.get("tentative")]
            return len(six) >= 3 and any(a.get("temporary") for a in six)
        assert wait_for(two_more, timeout=30), _global_addresses(host, "eth1")
        yield seed
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def test_several_addresses_in_one_prefix(slaac: Seed, engine) -> None:
    host = slaac.host
    addrs = [f"{a['local']}/{a['prefixlen']}" for a in _global_addresses(host, "eth1")]
    assert len([a for a in addrs if ":" in a]) >= 3 and "10.0.1.3/24" in addrs, addrs
    svc = connection(SVC, "eth1", addrs, "10.0.1.1", "fd00:1::1", enable="yes", match="incoming,source")
    assert not slaac.tcp("10.0.1.3"), "without a policy the reply leaves by eth0 and is dropped"
    result = engine.reconcile(svc)
    assert result["plans"][SVC]["status"] == "ok", result
    table = result["plans"][SVC]["allocation"]["table"]
    for family in ("-4", "-6"):
        routes = host.ipj(family, "route", "show", "table", str(table))
        dsts = [r["dst"] for r in routes]
        assert len(dsts) == len(set(dsts)), f"one route per destination: {routes}"
    assert {r["dst"] for r in host.ipj("-6", "route", "show", "table", str(table))} == {"default", "fd00:1::/64"}
    rules6 = [r for r in host.ipj("-6", "rule") if str(r.get("protocol")) in ("214", "nm-policy-routing")]
    assert len([r for r in rules6 if r.get("src", "all") != "all"]) == len([a for a in addrs if ":" in a])
    for address in ("10.0.1.2", "10.0.1.3", *[a.split("/")[0] for a in addrs if ":" in a]):
        assert tcp_check(host, slaac.mon, address, 8022), f"traffic to {address}"
    again = engine.reconcile(svc)
    assert again["changes"] == [] and again["plans"][SVC]["status"] == "ok", again
    inspected = engine.call("inspect")
    assert inspected.get("drift") == {}, inspected


def _odd_link(seed: Seed, name: str, n: int) -> None:
    seed.host.ip("link", "add", name, "type", "veth", "peer", "name", f"odd{n}")
    seed.host.ip("link", "set", name, "up")
    seed.host.ip("addr", "add", f"10.0.{20 + n}.2/24", "dev", name)


def test_interface_names_nft_would_not_read_literally(seed: Seed, engine) -> None:
    odd = {ODD: "x*", ODD2: "v\\1", ODD3: "@set"}
    for n, name in enumerate(odd.values()):
        _odd_link(seed, name, n)  # the kernel accepts these names
    conns = [connection(uuid, name, [f"10.0.{20 + n}.2/24"], enable="yes")
             for n, (uuid, name) in enumerate(odd.items())]
    svc = connection(SVC, "eth1", ["10.0.1.2/24", "fd00:1::2/64"], "10.0.1.1", "fd00:1::1", enable="yes")
    result = engine.reconcile(svc, *conns)
    assert result["plans"][SVC]["status"] == "ok", result
    for uuid, name in odd.items():
        plan = result["plans"][uuid]
        assert plan["status"] == "conflict", plan
        assert f"interface name {name!r}" in plan["errors"][0] and "nftables cannot match it" in plan["errors"][0]
    listing = json.loads(seed.host.run("nft", "-j", "list", "map", "inet", "nm_policy_routing",
                                       "incoming").stdout)
    elems = [e[0] for item in listing["nftables"] if "map" in item for e in item["map"].get("elem", [])]
    assert elems == ["eth1"], "the other connection's marking is installed"
    assert seed.tcp(Seed.SERVICE4)
    assert engine.reconcile(svc, *conns)["changes"] == []


def test_one_family_failing_keeps_the_other(seed: Seed, engine) -> None:
    """The kernel refuses the IPv6 part (its source address is not on the host): IPv4 stays."""
    svc = connection(SVC, "eth1", ["10.0.1.2/24", "fd00:1::99/64"], "10.0.1.1", "fd00:1::1", enable="yes")
    result = engine.reconcile(svc)
    plan = result["plans"][SVC]
    assert plan["status"] == "ok" and "IPv6" in plan["errors"][0] and "IPv4" not in plan["errors"][0], plan
    ours4 = [r for r in seed.host.ipj("-4", "rule") if str(r.get("protocol")) in ("214", "nm-policy-routing")]
    ours6 = [r for r in seed.host.ipj("-6", "rule") if str(r.get("protocol")) in ("214", "nm-policy-routing")]
    # the fwmark rule, and the incoming policy's forward rule (iif eth1 ... lookup main)
    assert sorted("iif" in r for r in ours4) == [False, True] and ours6 == []
    assert seed.tcp(Seed.SERVICE4)
    again = engine.reconcile(svc)
    assert [c for c in again["changes"] if "-4" in c] == [], again["changes"]
