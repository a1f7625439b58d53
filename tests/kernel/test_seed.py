"""The seed scenario, for real: replies leave by the interface the request came in on."""

from __future__ import annotations

import pytest

from tests.conftest import connection
from tests.lab.netns import Seed

pytestmark = pytest.mark.kernel

SVC = "5e1f0000-0000-4000-8000-000000000001"


def service(addresses=("10.0.1.2/24", "fd00:1::2/64"), **policy: str):
    values = dict(enable="yes", table="100", fwmark="0x1", priority="1000")
    values.update(policy)
    return connection(SVC, "eth1", list(addresses), "10.0.1.1", "fd00:1::1", **values)


def test_seed_fixed_by_policy_and_clean_after_removal(seed: Seed, engine) -> None:
    host = seed.host
    before = host.snapshot(["eth0", "eth1"])
    assert not seed.ping(Seed.SERVICE4), "the seed problem should exist before the policy"
    assert not seed.tcp(Seed.SERVICE4)
    assert not seed.ping(Seed.SERVICE6)
    assert not seed.tcp(Seed.SERVICE6)

    result = engine.reconcile(service())
    assert result["plans"][SVC]["status"] == "ok", result
    assert host.conf("ipv4", "eth1", "src_valid_mark") == 1
    assert host.conf("ipv4", "eth0", "src_valid_mark") == 0

    tx0, tx1 = host.counters("eth0")["tx"], host.counters("eth1")["tx"]
    assert seed.ping(Seed.SERVICE4, count=3)
    assert seed.tcp(Seed.SERVICE4)
    assert host.counters("eth1")["tx"] - tx1 >= 3 + 3, "replies should leave by eth1"
    assert host.counters("eth0")["tx"] - tx0 <= 2, "replies should not leave by eth0"
    assert seed.ping(Seed.SERVICE6)
    assert seed.tcp(Seed.SERVICE6)

    rules = host.ipj("-4", "rule")
    ours = [r for r in rules if r.get("protocol") == "214" or r.get("protocol") == 214
            or str(r.get("protocol")) == "nm-policy-routing"]
    assert len(ours) == 2, ours
    assert ours[1]["priority"] == 1000 and ours[1]["table"] == "100" and "iif" not in ours[1]
    assert (ours[0]["priority"], ours[0]["iif"], ours[0]["table"]) == (999, "eth1", "main")

    engine.remove(SVC)
    assert host.snapshot(["eth0", "eth1"]) == before
    assert not seed.ping(Seed.SERVICE4)


def test_seed_ipv6_only_connection(seed: Seed, engine) -> None:
    before = seed.host.snapshot(["eth0", "eth1"])
    assert not seed.tcp(Seed.SERVICE6)
    result = engine.reconcile(service(addresses=("fd00:1::2/64",)))
    assert result["plans"][SVC]["status"] == "ok", result
    assert seed.ping(Seed.SERVICE6)
    assert seed.tcp(Seed.SERVICE6)
    assert not seed.tcp(Seed.SERVICE4), "IPv4 was not asked for"
    assert seed.host.ipj("-4", "rule", "show", "table", "100") == []
    engine.remove(SVC)
    assert seed.host.snapshot(["eth0", "eth1"]) == before
