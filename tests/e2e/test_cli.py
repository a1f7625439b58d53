"""The CLI against a real NetworkManager: set/show/unset, explain, dry-run, status drift, defaults."""

from __future__ import annotations

import json
import re
from typing import Dict, Iterator

import pytest

from tests.lab.netns import Lab, Seed
from tests.lab.nm import SERVICE_UUID
from tests.lab.world import World

pytestmark = pytest.mark.nm

EVERY_KEY = {"enable": "yes", "table": "100", "fwmark": "0x10/0xf0", "priority": "1000",
             "match": "incoming,source", "src-valid-mark": "yes", "rp-filter": "loose", "family": "ipv4",
             "routes": "192.0.2.0/24 via 10.0.1.254"}
SEED = ["enable", "yes", "table", "100", "fwmark", "0x1", "priority", "1000"]


@pytest.fixture
def world(lab: Lab) -> Iterator[World]:
    w = World(lab, hook=False)
    try:
        w.nm.seed_keyfiles(user_service={"other.app": "keep-me"})
        w.nm.up("mgmt")
        w.nm.up("service")
        yield w
    finally:
        w.close()


def settings(world: World) -> str:
    """The profile as NetworkManager holds it (GetSettings through busctl-like dbus-send)."""
    out = world.nm.run_in_host("dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.NetworkManager",
                               "/org/freedesktop/NetworkManager/Settings",
                               "org.freedesktop.NetworkManager.Settings.GetConnectionByUuid",
                               f"string:{SERVICE_UUID}").stdout
    path = out.split('object path "', 1)[1].split('"', 1)[0]
    reply = world.nm.run_in_host("dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.NetworkManager",
                                 path, "org.freedesktop.NetworkManager.Settings.Connection.GetSettings").stdout
    return reply.split("\n", 1)[1]  # without the header line (time, serials)


def user_data(world: World) -> Dict[str, str]:
    text = settings(world)
    section = text.split('string "user"', 1)[1] if 'string "user"' in text else ""
    return dict(re.findall(r'string "([^"]+)"\s+string "([^"]*)"', section))


def test_set_show_round_trip_every_key(world: World) -> None:
    args = [word for key, value in EVERY_KEY.items() for word in (key, value)]
    assert world.cli("set", "service", *args).returncode == 0
    shown = json.loads(world.cli("show", "--json", "service").stdout)
    values = {row["key"]: (row["value"], row["source"]) for row in shown["keys"]}
    for key, value in EVERY_KEY.items():
        assert values[f"nm-policy-routing.{key}"] == (value, "profile")
    assert shown["allocation"] == {"table": 100, "priority": 1000, "fwmark": "0x10/0xf0"}
    human = world.cli("show", "eth1").stdout  # by interface name too
    assert "resolves to: table 100, priority 1000, fwmark 0x10/0xf0" in human


def test_set_invalid_exits_65_and_changes_nothing(world: World) -> None:
    assert world.cli("set", "service", *SEED).returncode == 0
    before = settings(world)
    proc = world.cli("set", "service", "table", "253", "priority", "١٠")
    assert proc.returncode == 65
    assert "nm-policy-routing.table='253'" in proc.stderr and "accepted:" in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert settings(world) == before
    assert world.cli("set", "service", "tabel", "5").returncode == 65
    assert world.cli("set", "service", "table").returncode == 2


def test_other_settings_and_foreign_user_keys_survive(world: World) -> None:
    before = settings(world)
    assert world.cli("set", SERVICE_UUID, *SEED).returncode == 0
    data = user_data(world)
    assert data["other.app"] == "keep-me" and data["nm-policy-routing.table"] == "100"
    assert world.cli("unset", "service", "table", "fwmark", "priority", "enable").returncode == 0
    assert user_data(world) == {"other.app": "keep-me"}
    assert settings(world) == before


def test_explain_names_rule_table_and_interface(world: World) -> None:
    assert world.cli("set", "service", *SEED).returncode == 0
    proc = world.cli("explain", Seed.MON4, "--from", Seed.SERVICE4, "--iif", "eth1", "--json")
    answer = json.loads(proc.stdout)
    with_policy, without = answer["with_policy"], answer["without_policy"]
    assert with_policy["rule_priority"] == 1000 and "fwmark 0x1" in with_policy["rule"] and with_policy["ours"]
    assert with_policy["table"] == 100 and with_policy["dev"] == "eth1"
    assert with_policy["kernel"]["dev"] == "eth1", "the kernel agrees"
    assert without["dev"] == "eth0" and without["table"] == 254 and not without["ours"]
    assert answer["changed_by_policy"] is True
    human = world.cli("explain", Seed.MON4, "--from", Seed.SERVICE4, "--iif", "eth1").stdout
    assert "lookup 100" in human and "leaves by eth1" in human and "leaves by eth0" in human
    plain = json.loads(world.cli("explain", Seed.MON4, "--json").stdout)
    assert plain["with_policy"]["dev"] == "eth0" and plain["changed_by_policy"] is False


def ours_in_kernel(world: World) -> Dict[str, object]:
    state = world.policy_state()
    nft = world.host.run("nft", "-j", "list", "table", "inet", "nm_policy_routing", check=False).stdout
    items = json.loads(nft)["nftables"] if nft else []
    for item in items:
        for obj in item.values():
            if isinstance(obj, dict):
                obj.pop("handle", None)
    return {"rules": (world.our_rules(), world.our_rules("-6")), "routes": (state["ours4"], state["ours6"]),
            "nft": items, "sysctls": (state["svm"], state["rpf"])}


def test_dry_run_commands_give_the_same_kernel_state(world: World) -> None:
    world.cli("set", "service", "enable", "yes", "match", "incoming,source,outgoing", "rp-filter", "strict",
              "routes", "192.0.2.0/24 via 10.0.1.254")
    world.cli("flush")
    clean = ours_in_kernel(world)
    script = world.cli("apply", "--dry-run").stdout
    assert "nft -j -f -" in script and "ip -4 rule add" in script and "sysctl -qw" in script
    assert ours_in_kernel(world) == clean, "a dry run changes nothing"
    world.host.run("sh", "-c", script)
    by_shell = ours_in_kernel(world)
    svm, rpf = clean["sysctls"][0][1], clean["sysctls"][1][1]  # eth1's, before (NetworkManager set rp_filter)
    world.host.sh("nft delete table inet nm_policy_routing; ip -4 rule flush protocol 214; "
                  "ip -6 rule flush protocol 214; ip -4 route flush table all protocol 214; "
                  "ip -6 route flush table all protocol 214; "
                  f"sysctl -qw net/ipv4/conf/eth1/src_valid_mark={svm} net/ipv4/conf/eth1/rp_filter={rpf}")
    assert ours_in_kernel(world) == clean
    assert world.cli("apply").returncode == 0
    assert ours_in_kernel(world) == by_shell
    assert world.cli("apply", "--dry-run").stdout == "# nothing to change\n"


def test_status_shows_drift_and_apply_repairs(world: World) -> None:
    world.cli("set", "service", *SEED)
    assert json.loads(world.cli("status", "--json").stdout)["connections"][0]["status"] == "applied"
    world.host.ip("rule", "del", "priority", "1000", "fwmark", "0x1", "table", "100")
    status = json.loads(world.cli("status", "--json").stdout)["connections"][0]
    assert status["status"] == "drift"
    assert status["drift"] == ["missing: -4 rule priority 1000 fwmark 0x1/0xffffffff table 100"]
    assert "drift:" in world.cli("status").stdout
    assert world.cli("apply").returncode == 0
    assert json.loads(world.cli("status", "--json").stdout)["connections"][0]["status"] == "applied"
    assert world.seed.tcp(Seed.SERVICE4)


def test_status_lists_inactive_profiles_with_a_policy(world: World) -> None:
    world.cli("set", "service", *SEED)
    world.nm.down("service")
    world.cli("apply")
    rows = json.loads(world.cli("status", "--json").stdout)["connections"]
    assert [(r["id"], r["status"]) for r in rows] == [("service", "not active")]


def test_global_defaults_and_profile_override(world: World, tmp_path) -> None:
    defaults = tmp_path / "defaults.conf"
    defaults.write_text("[defaults]\nenable = yes\nmatch = incoming,source\n\n"
                        "[interface:eth1]\ntable = 300\n")
    env = {"NM_POLICY_ROUTING_DEFAULTS": str(defaults)}
    run = lambda *a: world.host.run(world_cli(), *a, env={**world.cli_env(), **env}, check=False)  # noqa: E731
    assert run("apply").returncode == 0
    tables = {r["table"] for r in world.our_rules()}
    assert tables and "300" in tables, tables
    assert len({r["table"] for r in world.our_rules()}) == 2, "mgmt (eth0) got a policy from [defaults] too"
    shown = json.loads(run("show", "--json", "service").stdout)
    sources = {row["key"]: row["source"] for row in shown["keys"]}
    assert sources["nm-policy-routing.table"] == f"{defaults} [interface:eth1]"
    assert sources["nm-policy-routing.enable"] == f"{defaults} [defaults]"
    assert run("set", "service", "table", "400").returncode == 0
    run("apply")
    assert "400" in {r["table"] for r in world.our_rules()}
    assert "300" not in {r["table"] for r in world.our_rules()}


def world_cli() -> str:
    from tests.lab.world import CLI

    return CLI
