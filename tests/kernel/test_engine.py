"""The engine against a real kernel in namespaces: matches, idempotency, ownership, isolation."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import connection
from tests.lab.netns import PYTHON, TCPCHECK, Seed

pytestmark = pytest.mark.kernel

SVC = "5e1f0000-0000-4000-8000-000000000001"
MGMT = "5e1f0000-0000-4000-8000-000000000002"
THIRD = "5e1f0000-0000-4000-8000-000000000003"


def service(**policy: str):
    values = dict(enable="yes")
    values.update(policy)
    return connection(SVC, "eth1", ["10.0.1.2/24", "fd00:1::2/64"], "10.0.1.1", "fd00:1::1", **values)


def ours(ns, family: str = "-4"):
    return [r for r in ns.ipj(family, "rule") if str(r.get("protocol")) in ("214", "nm-policy-routing")]


def test_match_source_fixes_seed_without_marks(seed: Seed, engine) -> None:
    assert not seed.tcp(Seed.SERVICE4)
    result = engine.reconcile(service(match="source"))
    assert result["plans"][SVC]["status"] == "ok", result
    assert seed.tcp(Seed.SERVICE4) and seed.ping(Seed.SERVICE4)
    assert seed.tcp(Seed.SERVICE6)
    assert [r.get("src") for r in ours(seed.host)] == ["10.0.1.2"]
    assert seed.host.run("nft", "list", "table", "inet", "nm_policy_routing", check=False).returncode != 0
    assert seed.host.conf("ipv4", "eth1", "src_valid_mark") == 0


class Flow:
    """A long-lived TCP connection from the host to REMOTE4 (by the default route, eth1)."""

    def __init__(self, seed: Seed, port: int) -> None:
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", seed.mon.name, PYTHON, TCPCHECK, "serve", "0.0.0.0", str(port), "1"],
            stdout=subprocess.PIPE, text=True)
        assert self.server.stdout.readline().strip() == "ready"
        self.client = subprocess.Popen(
            ["ip", "netns", "exec", seed.host.name, PYTHON, TCPCHECK, "hold", Seed.REMOTE4, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.client.stdout.readline().strip() == "connected"

    def works(self) -> bool:
        self.client.stdin.write("ping\n")
        self.client.stdin.flush()
        return self.client.stdout.readline().strip() == "ok"

    def close(self) -> None:
        for proc in (self.client, self.server):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("with_policy", [True, False], ids=["policy", "no-policy"])
def test_match_outgoing_keeps_flow_when_default_route_moves(seed: Seed, engine, with_policy: bool) -> None:
    if with_policy:
        assert engine.reconcile(service(match="outgoing"))["plans"][SVC]["status"] == "ok"
    flow = Flow(seed, 8030)
    try:
        assert flow.works()
        seed.host.ip("route", "replace", "default", "via", "10.0.0.1", "dev", "eth0")
        assert flow.works() is with_policy
        if with_policy:  # a new flow follows the new default route
            assert seed.host.ip("route", "get", Seed.REMOTE4).stdout.split()[4] == "eth0"
    finally:
        flow.close()


def test_outgoing_does_not_capture_packets_marked_by_their_owner(seed: Seed, engine) -> None:
    engine.reconcile(service(match="outgoing"))
    seed.host.sh("nft add table inet probe; "
                 "nft add chain inet probe post '{ type filter hook postrouting priority 0; }'; "
                 "nft add rule inet probe post oifname eth1 meta mark 0x77 counter; "
                 "nft add rule inet probe post oifname eth1 meta mark != 0x77 meta l4proto icmp counter")
    seed.host.run("ping", "-c", "2", "-i", "0.2", "-W", "1", "-m", "119", Seed.REMOTE4, check=False)
    seed.host.run("ping", "-c", "2", "-i", "0.2", "-W", "1", Seed.REMOTE4, check=False)
    listing = json.loads(seed.host.run("nft", "-j", "list", "table", "inet", "probe").stdout)
    counters = [e["counter"]["packets"] for item in listing["nftables"] if "rule" in item
                for e in item["rule"]["expr"] if "counter" in e]
    assert counters[0] >= 2, "the owner's mark must be kept as it is"
    assert counters[1] >= 2, "unmarked packets get our mark"


def test_applying_ten_times_equals_applying_once(seed: Seed, engine) -> None:
    policy = service(match="incoming,source,outgoing", routes="192.0.2.0/24 via 10.0.1.254")
    engine.reconcile(policy)
    once = seed.host.snapshot(["eth0", "eth1"])
    for _ in range(9):
        result = engine.reconcile(policy)
        assert result["changes"] == [], result["changes"]
        assert seed.host.snapshot(["eth0", "eth1"]) == once
    for family in ("-4", "-6"):
        rules = [json.dumps(r, sort_keys=True) for r in seed.host.ipj(family, "rule")]
        assert len(rules) == len(set(rules)), "no duplicate rule"


FOREIGN_NFT = (
    "nft add table inet foreign; "
    "nft add chain inet foreign pre '{ type filter hook prerouting priority -160; }'; "
    "nft add rule inet foreign pre iifname eth1 meta mark set meta mark or 0x10; "
    "nft add chain inet foreign inp '{ type filter hook input priority 0; }'; "
    "nft add rule inet foreign inp iifname eth1 meta mark and 0x10 == 0x10 meta mark and 0xff000000 != 0 counter"
)


def _foreign(ns):
    rules = [r for r in ns.ipj("-4", "rule") if r.get("priority") == 500]
    routes = ns.ipj("-4", "route", "show", "table", "300")
    nft = json.loads(ns.run("nft", "-j", "list", "table", "inet", "foreign").stdout)["nftables"][1:]
    for item in nft:  # the counter moves with traffic; the rest must not change
        for expr in item.get("rule", {}).get("expr", []):
            expr.pop("counter", None)
    return rules, routes, nft


def test_foreign_state_survives_apply_and_remove(seed: Seed, engine) -> None:
    host = seed.host
    host.ip("rule", "add", "priority", "500", "from", "192.0.2.1", "lookup", "300")
    host.ip("route", "add", "192.0.2.0/24", "dev", "eth0", "table", "300")
    host.sh(FOREIGN_NFT)
    before = _foreign(host)
    result = engine.reconcile(service())  # auto table, priority and mark
    assert result["plans"][SVC]["status"] == "ok", result
    assert seed.tcp(Seed.SERVICE4), "our mark works beside the foreign bit"
    listing = json.loads(host.run("nft", "-j", "list", "table", "inet", "foreign").stdout)
    counted = [e["counter"]["packets"] for item in listing["nftables"] if "rule" in item
               for e in item["rule"]["expr"] if "counter" in e]
    assert counted and counted[0] > 0, "packets carry both the foreign bit and ours"
    assert _foreign(host) == before
    engine.remove(SVC)
    assert _foreign(host) == before


def test_conflicts_are_refused_and_nothing_is_applied(seed: Seed, engine) -> None:
    host = seed.host
    host.ip("route", "add", "192.0.2.0/24", "dev", "eth0", "table", "300")
    host.ip("rule", "add", "priority", "700", "from", "192.0.2.7", "lookup", "300")
    before = host.snapshot(["eth0", "eth1"])
    result = engine.reconcile(service(table="300"))
    plan = result["plans"][SVC]
    assert plan["status"] == "conflict"
    assert "table 300 already holds routes that are not ours" in plan["errors"][0]
    assert host.snapshot(["eth0", "eth1"]) == before
    result = engine.reconcile(service(priority="700"))
    assert "rule priority 700 already holds rules that are not ours" in result["plans"][SVC]["errors"][0]
    assert host.snapshot(["eth0", "eth1"]) == before


def test_three_connections_one_invalid(seed: Seed, engine) -> None:
    seed.add_link(2, "eth2")
    good1 = connection(MGMT, "eth0", ["10.0.0.2/24"], None, None, enable="yes", match="source")
    good2 = service()
    bad = connection(THIRD, "eth2", ["10.0.2.2/24"], "10.0.2.1", None, enable="yes", table="253")
    result = engine.reconcile(good1, good2, bad)
    assert result["plans"][MGMT]["status"] == "ok"
    assert result["plans"][SVC]["status"] == "ok"
    assert result["plans"][THIRD]["status"] == "invalid"
    error = result["plans"][THIRD]["errors"][0]
    assert "nm-policy-routing.table='253'" in error and "accepted:" in error
    tables = {r["table"] for r in ours(seed.host)}
    assert tables - {"main"} and len(tables - {"main"}) == 2, "main: the forward rule of an incoming policy"
    assert seed.host.conf("ipv4", "eth2", "src_valid_mark") == 0
    assert seed.tcp(Seed.SERVICE4)
