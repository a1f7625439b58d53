"""Rollback restores exactly the state before: a real kernel, a step made to fail by a fault point."""

from __future__ import annotations

import pytest

from tests.conftest import connection
from tests.lab.netns import Seed

pytestmark = pytest.mark.kernel

SVC = "5e1f0000-0000-4000-8000-0000000000c1"
MGMT = "5e1f0000-0000-4000-8000-0000000000c2"


def fail_at(point: str):
    return {"NM_POLICY_ROUTING_FAULT_AT": point, "NM_POLICY_ROUTING_FAULT_ACTION": "raise"}


def service(gateway: str = "10.0.1.1", **policy: str):
    values = dict(enable="yes", rp_filter="loose")
    values.update(policy)
    return connection(SVC, "eth1", ["10.0.1.2/24", "fd00:1::2/64"], gateway, "fd00:1::1", **values)


def mgmt():
    return connection(MGMT, "eth0", ["10.0.0.2/24"], None, None, enable="yes", match="source",
                      rp_filter="loose", routes="198.51.100.0/24 via 10.0.0.1")


def test_verify_failure_after_a_removal_restores_everything(seed: Seed, engine) -> None:
    """The removal restored eth0's rp_filter and would forget its original; the rollback must
    still put back the other connection's sysctl, routes and rules."""
    host = seed.host
    assert engine.reconcile(service(), mgmt())["plans"][MGMT]["status"] == "ok"
    before = host.snapshot(["eth0", "eth1"])
    assert before["eth0.rp_filter"] == 2
    failed = engine.call("reconcile", connections=[service()], env=fail_at("verify"))
    assert failed.get("exception") == "VerifyError", failed
    assert host.snapshot(["eth0", "eth1"]) == before
    assert engine.reconcile(service())["plans"][SVC]["status"] == "ok"  # later, the removal happens
    assert host.conf("ipv4", "eth0", "rp_filter") == 1, "eth0's original came back: it was remembered"


def test_a_failed_change_puts_back_the_route_replace_overwrote(seed: Seed, engine) -> None:
    host = seed.host
    assert engine.reconcile(service(match="source"))["plans"][SVC]["status"] == "ok"
    before = host.snapshot(["eth0", "eth1"])
    changed = service("10.0.1.254", match="incoming,source")  # a new gateway and marking
    result = engine.call("reconcile", connections=[changed], env=fail_at("nft"))
    assert "exception" not in result, result
    plan = result["plans"][SVC]
    assert plan["status"] == "error" and "injected fault" in plan["errors"][0], plan
    assert host.snapshot(["eth0", "eth1"]) == before, "the default route via 10.0.1.1 is back"
    assert seed.tcp(Seed.SERVICE4), "the policy in place keeps working"


def test_a_route_refused_in_the_batch_is_taken_back_for_its_connection_alone(seed: Seed, engine) -> None:
    """Every connection's routes go to the kernel in one netlink batch: the route the kernel refuses
    (a gateway that is not on-link) is mapped back to its connection and address family, whose part
    is taken back; the same connection's IPv6 part and the other connection stay installed."""
    host = seed.host
    refused = service(routes="198.51.100.0/24 via 10.9.9.9")
    result = engine.reconcile(refused, mgmt())
    plan, other = result["plans"][SVC], result["plans"][MGMT]
    assert plan["status"] == "ok" and other["status"] == "ok" and not other["errors"], result
    (message,) = plan["errors"]
    assert message.startswith("connection conn-eth1 (") and "on eth1" in message and "IPv4" in message \
        and "198.51.100.0/24 via 10.9.9.9" in message, message
    assert "Network is unreachable" in message, message
    table, mgmt_table = plan["allocation"]["table"], other["allocation"]["table"]
    assert host.ipj("-4", "route", "show", "table", str(table)) == []
    assert not [r for r in host.ipj("-4", "rule") if r.get("table") == str(table)]
    assert {r["dst"] for r in host.ipj("-6", "route", "show", "table", str(table))} == {"default", "fd00:1::/64"}
    assert [r for r in host.ipj("-6", "rule") if r.get("table") == str(table)]
    assert "198.51.100.0/24" in {r["dst"] for r in host.ipj("-4", "route", "show", "table", str(mgmt_table))}
    assert [r.get("src") for r in host.ipj("-4", "rule") if r.get("table") == str(mgmt_table)] == ["10.0.0.2"]
