"""The record is not trusted: a damaged one is set aside and rebuilt from the kernel's tagged
state; cached policies are validated again."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import pytest

from tests.conftest import connection
from tests.lab.netns import Seed
from tests.lab.world import CLI

pytestmark = pytest.mark.kernel

SVC = "5e1f0000-0000-4000-8000-0000000000b1"
WRONG_TYPES = {"version": 1, "connections": [1, 2], "allocations": {SVC: {"table": "100", "priority": None}},
               "sysctls": {"ipv4/eth1/src_valid_mark": "zero"}, "outcomes": 5, "policies": {"k": []}}


def service(**policy: str):
    return connection(SVC, "eth1", ["10.0.1.2/24", "fd00:1::2/64"], "10.0.1.1", "fd00:1::1", enable="yes",
                      **policy)


def ours(ns, family: str = "-4"):
    return [r for r in ns.ipj(family, "rule") if str(r.get("protocol")) in ("214", "nm-policy-routing")]


def _write(state_dir: str, data) -> None:
    with open(os.path.join(state_dir, "state.json"), "w") as handle:
        json.dump(data, handle)


def _cli(seed: Seed, state_dir: str, *args: str):
    env = dict(os.environ, NM_POLICY_ROUTING_STATE_DIR=state_dir,
               DBUS_SYSTEM_BUS_ADDRESS="unix:path=/nonexistent/npr-no-bus")
    return seed.host.run(CLI, *args, env=env, check=False)


def test_wrong_types_every_command_works_and_flush_removes_all(seed: Seed, engine, state_dir: str) -> None:
    first = engine.reconcile(service())
    assert first["plans"][SVC]["status"] == "ok", first
    table = first["plans"][SVC]["allocation"]["table"]
    _write(state_dir, WRONG_TYPES)
    assert "drift" in engine.call("inspect")
    status = _cli(seed, state_dir, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert "is damaged" in status.stderr and "connections" in status.stderr
    again = engine.ensure(service())  # the hook's door: rebuilt, same table as the kernel shows
    assert again["plans"][SVC]["status"] == "ok", again
    assert again["plans"][SVC]["allocation"]["table"] == table
    assert again["changes"] == [], "nothing moved"
    aside = glob.glob(os.path.join(state_dir, "state.json.damaged-*"))
    assert len(aside) == 1 and json.load(open(aside[0])) == WRONG_TYPES, "set aside as it was"
    _write(state_dir, WRONG_TYPES)
    flushed = _cli(seed, state_dir, "flush")  # what package removal runs
    assert flushed.returncode == 0, flushed.stderr
    assert ours(seed.host) == [] and ours(seed.host, "-6") == []
    assert seed.host.run("nft", "list", "table", "inet", "nm_policy_routing", check=False).returncode != 0
    assert [r for r in seed.host.ipj("-4", "route", "show", "table", "all")
            if str(r.get("protocol")) in ("214", "nm-policy-routing")] == []
    assert json.load(open(os.path.join(state_dir, "state.json")))["connections"] == {}


def _old_key(user_data) -> str:
    """The cache key before validation rules were part of it."""
    text = json.dumps([sorted(user_data.items()), ()], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def test_cached_policy_is_validated_again(seed: Seed, engine, state_dir: str) -> None:
    svc = service(table="200", priority="2000", match="source")
    assert engine.reconcile(svc)["plans"][SVC]["status"] == "ok"
    path = os.path.join(state_dir, "state.json")
    data = json.load(open(path))
    assert data["policies"], "a policy is cached"
    bad = dict(next(iter(data["policies"].values())), table=254, priority=0)
    for key in [*data["policies"], _old_key(svc["user_data"])]:
        data["policies"][key] = bad
    _write(state_dir, data)
    result = engine.reconcile(svc)
    assert result["plans"][SVC]["status"] == "ok", result
    rules = ours(seed.host)
    assert rules and all(r["priority"] == 2000 and r["table"] == "200" for r in rules), rules
    assert not any(r["priority"] == 0 for r in seed.host.ipj("-4", "rule") if r.get("table") == "main"
                   and str(r.get("protocol")) in ("214", "nm-policy-routing"))
    assert seed.tcp(Seed.SERVICE4)
