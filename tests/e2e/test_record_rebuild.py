"""A damaged record with the hook alone: the next event rebuilds it from every active
connection, so the other connections keep their policies."""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests.lab.netns import Lab, Seed, wait_for
from tests.lab.nm import MGMT_UUID, SERVICE_UUID
from tests.lab.world import World

pytestmark = pytest.mark.nm

SEED = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "100",
        "nm-policy-routing.fwmark": "0x1", "nm-policy-routing.priority": "1000"}
MGMT = {"nm-policy-routing.enable": "yes", "nm-policy-routing.match": "source",
        "nm-policy-routing.table": "200", "nm-policy-routing.priority": "2000"}


def test_hook_event_after_damage_keeps_every_connection(lab: Lab) -> None:
    world = World(lab, hook=True)
    try:
        world.nm.seed_keyfiles(user_service=SEED, user_mgmt=MGMT)
        world.nm.up("mgmt")
        world.nm.up("service")
        assert world.wait_rules(lambda rules: {r.get("table") for r in rules} == {"100", "200"})
        state = world.policy_state()
        with open(os.path.join(world.state_dir, "state.json"), "w") as handle:
            json.dump({"version": 1, "connections": "garbage", "sysctls": [], "outcomes": 1}, handle)
        proc = world.dispatch(SERVICE_UUID, "up")
        # the next event rebuilds it: this one, or NetworkManager's own 'up' to the hook if it
        # was still on its way (the record is set aside once, by whichever came first)
        assert proc.returncode == 0, proc.stderr
        assert glob.glob(os.path.join(world.state_dir, "state.json.damaged-*")), proc.stderr
        assert world.policy_state() == state, "both connections keep their policies"
        known = json.load(open(os.path.join(world.state_dir, "state.json")))["connections"]
        assert set(known) >= {SERVICE_UUID, MGMT_UUID}
        world.nm.down("mgmt")
        assert wait_for(lambda: {r.get("table") for r in world.our_rules()} == {"100"}, timeout=15)
        assert Seed.tcp(world.seed, Seed.SERVICE4)
    finally:
        world.close()


def test_a_pre_up_after_damage_installs_its_own_policy_before_activated(lab: Lab) -> None:
    """The rebuild on a real pre-up installs the activating connection's policy before ACTIVATED
    and keeps the other's. (1.42 already lists its addresses then; 1.52 may not, the case
    test_cli_pure's rebuild test holds the event's own facts to.)"""
    world = World(lab, hook=True)
    try:
        world.nm.seed_keyfiles(user_service=SEED, user_mgmt=MGMT)
        world.nm.up("mgmt")
        assert world.wait_rules(lambda rules: {r.get("table") for r in rules} == {"200"})
        with open(os.path.join(world.state_dir, "state.json"), "w") as handle:
            json.dump({"version": 1, "connections": "garbage"}, handle)
        (seen,) = world.watch_activations(1)
        assert seen["rule"] and seen["route"], f"service's policy came after ACTIVATED: {seen}"
        assert glob.glob(os.path.join(world.state_dir, "state.json.damaged-*")), "the pre-up rebuilt the record"
        assert {r.get("table") for r in world.our_rules()} == {"200"}, "mgmt kept its policy throughout"
    finally:
        world.close()
