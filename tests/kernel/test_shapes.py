"""Interface names of every legal shape, and conntrack teardown scoped to our mark."""

from __future__ import annotations

import pytest

from tests.conftest import connection
from tests.lab.netns import Seed

pytestmark = pytest.mark.kernel

SHAPES = [
    ("eth1.100", "veth named like a VLAN"),
    ("svc-port_15char", "15 characters, '-' and '_'"),
    ("br-svc0", "bridge"),
    ("mv-svc", "macvlan"),
    ("tun-svc", "tun"),
]


def make_link(seed: Seed, name: str, n: int) -> None:
    host = seed.host
    if name == "br-svc0":
        host.ip("link", "add", name, "type", "bridge")
        host.ip("link", "add", "brport0", "type", "veth", "peer", "name", "brpeer0")
        host.ip("link", "set", "brport0", "master", name)
        for link in ("brport0", "brpeer0"):
            host.ip("link", "set", link, "up")
    elif name == "mv-svc":
        host.ip("link", "add", "mvparent", "type", "veth", "peer", "name", "mvpeer")
        host.ip("link", "set", "mvparent", "up")
        host.ip("link", "set", "mvpeer", "up")
        host.ip("link", "add", name, "link", "mvparent", "type", "macvlan", "mode", "bridge")
    elif name == "tun-svc":
        host.ip("tuntap", "add", "dev", name, "mode", "tun")
    else:
        host.ip("link", "add", name, "type", "veth", "peer", "name", f"peer{n}")
        host.ip("link", "set", f"peer{n}", "up")
    host.ip("link", "set", name, "up")
    host.ip("addr", "add", f"10.0.{n}.2/24", "dev", name)


@pytest.mark.parametrize("name,shape", SHAPES, ids=[s[1] for s in SHAPES])
def test_interface_shapes_get_exactly_their_policy(seed: Seed, engine, name: str, shape: str) -> None:
    n = 50 + SHAPES.index((name, shape))
    make_link(seed, name, n)
    host = seed.host
    eth1_before = host.conf("ipv4", "eth1", "src_valid_mark")
    conn = connection(f"5e1f0000-0000-4000-8000-0000000000{n}", name, [f"10.0.{n}.2/24"], f"10.0.{n}.1",
                      None, enable="yes", match="incoming,source", rp_filter="loose")
    result = engine.reconcile(conn)
    plan = result["plans"][conn["uuid"]]
    assert plan["status"] == "ok", plan
    assert host.conf("ipv4", name, "src_valid_mark") == 1
    assert host.conf("ipv4", name, "rp_filter") == 2
    assert host.conf("ipv4", "eth1", "src_valid_mark") == eth1_before
    table = str(plan["allocation"]["table"])
    routes = host.ipj("route", "show", "table", table)
    assert {r["dev"] for r in routes} == {name}
    nft = host.run("nft", "list", "table", "inet", "nm_policy_routing").stdout
    assert f'"{name}"' in nft
    engine.remove(conn["uuid"])
    assert host.conf("ipv4", name, "src_valid_mark") == 0
    assert host.ipj("route", "show", "table", table) == []


def conntrack(ns) -> str:
    return ns.run("conntrack", "-L", check=False).stdout + ns.run("conntrack", "-L", "-f", "ipv6", check=False).stdout


def test_down_removes_only_its_marked_conntrack_entries(seed: Seed, engine) -> None:
    svc = connection("5e1f0000-0000-4000-8000-000000000001", "eth1", ["10.0.1.2/24", "fd00:1::2/64"],
                     "10.0.1.1", "fd00:1::1", enable="yes", fwmark="0x100/0xf00")
    engine.reconcile(svc)
    assert seed.ping(Seed.SERVICE4) and seed.ping(Seed.SERVICE6)
    seed.host.run("ping", "-c", "1", "-W", "1", "10.0.0.1")  # an unrelated flow (unmarked)
    seed.host.sh("nft add table inet other; "
                 "nft add chain inet other out '{ type filter hook output priority 0; }'; "
                 "nft add rule inet other out ip daddr 10.0.0.1 ct mark set 0x5")
    seed.host.run("ping", "-c", "1", "-W", "1", "10.0.0.1", "-p", "ff")  # a flow with a foreign mark
    table = conntrack(seed.host)
    assert "dst=10.0.1.2" in table and "mark=256" in table
    assert "dst=fd00:1::2" in table
    engine.remove(svc["uuid"])
    after = conntrack(seed.host)
    assert "dst=10.0.1.2" not in after and "dst=fd00:1::2" not in after, after
    assert "dst=10.0.0.1" in after, "unrelated flows survive"
