"""Pure pieces behind the CLI and the hook: defaults file, fib model, commands, docs, env decoding."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nm_policy_routing import fib
from nm_policy_routing.cli import build_parser, main
from nm_policy_routing.clidoc import bash_completion, manpage
from nm_policy_routing.commands import route, rule, sysctl
from nm_policy_routing.config import parse
from nm_policy_routing.dispatch import decode_user_key, facts_from_env
from nm_policy_routing.model import Address, Connection, Route, Rule, Sysctl


def conn(iface: str, type_: str = "802-3-ethernet") -> Connection:
    return Connection("u", "c", iface, (Address("10.0.0.2", 24),), type=type_)


def test_defaults_sections_and_precedence() -> None:
    d = parse("[defaults]\nenable = yes\nmatch = incoming\n[type:802-11-wireless]\nmatch = outgoing\n"
              "[interface:wwan*]\nnm-policy-routing.enable = no\n", "/etc/x.conf")
    assert not d.problems
    assert d.for_connection(conn("eth0")) == {"enable": "yes", "match": "incoming"}
    assert d.for_connection(conn("wlan0", "802-11-wireless"))["match"] == "outgoing"
    assert d.for_connection(conn("wwan0"))["enable"] == "no"
    assert d.with_sources(conn("wwan0"))["enable"] == ("no", "/etc/x.conf [interface:wwan*]")


@pytest.mark.parametrize("text,word", [
    ("[defaults]\ntabel = 5\n", "did you mean"),
    ("[defaults]\ntable = 253\n", "reserved"),
    ("[bogus]\nenable = yes\n", "unknown section"),
    ("enable = yes\n", "cannot parse"),
])
def test_defaults_problems_are_reported(text: str, word: str) -> None:
    problems = " ".join(parse(text, "f.conf").problems)
    assert word in problems and "f.conf" in problems


def test_fib_lookup_follows_rules_and_longest_prefix() -> None:
    rules = [fib.FibRule(0, 255), fib.FibRule(1000, 100, fwmark=1, fwmask=0xFFFFFFFF, protocol=214),
             fib.FibRule(32766, 254), fib.FibRule(32767, 253)]
    routes = {254: [fib.FibRoute(254, "0.0.0.0/0", gateway="10.0.1.1", oif="eth1"),
                    fib.FibRoute(254, "10.0.9.0/24", gateway="10.0.0.1", oif="eth0")],
              100: [fib.FibRoute(100, "0.0.0.0/0", gateway="10.0.1.1", oif="eth1")]}
    rule_, route_ = fib.lookup(rules, routes, fib.Packet("10.0.9.2", mark=1))
    assert rule_.priority == 1000 and route_.oif == "eth1"
    rule_, route_ = fib.lookup(rules, routes, fib.Packet("10.0.9.2"))
    assert rule_.priority == 32766 and route_.oif == "eth0"
    assert fib.lookup(rules[:1], routes, fib.Packet("192.0.2.1")) == (None, None)


def test_commands_are_quoted_shell() -> None:
    assert rule("add", Rule(4, 1000, 100, 1, 0xFFFFFFFF)) == \
        "ip -4 rule add priority 1000 fwmark 0x1/0xffffffff table 100 protocol 214"
    assert rule("add", Rule(6, 999, 254, 1, 0xFFFFFFFF, iif="eth1")) == \
        "ip -6 rule add priority 999 iif eth1 fwmark 0x1/0xffffffff table 254 protocol 214"
    assert route("replace", Route(4, 100, "0.0.0.0/0", "eth1", "10.0.1.1", "10.0.1.2")) == \
        "ip -4 route replace 0.0.0.0/0 via 10.0.1.1 dev eth1 src 10.0.1.2 table 100 protocol 214"
    assert sysctl(Sysctl("ipv4", "eth1.100", "src_valid_mark", 1)) == \
        "sysctl -qw net/ipv4/conf/eth1.100/src_valid_mark=1"


def test_manpage_and_completion_come_from_the_parser() -> None:
    parser = build_parser()
    page = manpage(parser)
    assert page.startswith(".TH NM-POLICY-ROUTING 8")
    for command in ("set", "unset", "show", "status", "explain", "apply", "remove", "flush", "daemon"):
        assert f".B nm\\-policy\\-routing {command}" in page
    script = bash_completion(parser)
    assert "complete -F _nm_policy_routing nm-policy-routing" in script
    assert "--dry-run" in script and "src-valid-mark" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["frobnicate"])
    assert caught.value.code == 2


def test_user_data_env_decoding() -> None:
    assert decode_user_key("CONNECTION_USER_A__B_055_C") == "a.b-C"
    assert decode_user_key("CONNECTION_USER_NM_055POLICY_055ROUTING__ENABLE") == "nm-policy-routing.enable"
    assert decode_user_key("CONNECTION_ID") is None


def test_facts_from_dispatcher_environment() -> None:
    env = {"CONNECTION_UUID": "u1", "CONNECTION_ID": "service", "DEVICE_IP_IFACE": "eth1",
           "IP4_NUM_ADDRESSES": "1", "IP4_ADDRESS_0": "10.0.1.2/24 10.0.1.1",
           "IP6_NUM_ADDRESSES": "2", "IP6_ADDRESS_0": "fd00:1::2/64 ::", "IP6_ADDRESS_1": "garbage",
           "IP6_GATEWAY": "fd00:1::1"}
    c = facts_from_env("eth1", env, {"nm-policy-routing.enable": "yes"})
    assert c.iface == "eth1" and c.gateway4 == "10.0.1.1" and c.gateway6 == "fd00:1::1"
    assert [a.ip for a in c.addresses] == ["10.0.1.2", "fd00:1::2"]
    assert facts_from_env("eth1", {}, None) is None


def test_help_runs_without_root() -> None:
    out = subprocess.run([sys.executable, "-m", "nm_policy_routing", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "explain" in out.stdout


def test_a_crash_while_listing_foreign_tables_costs_only_that_check() -> None:
    import os
    import signal

    from nm_policy_routing.adapters.nftables import _in_child
    from nm_policy_routing.errors import KernelError

    assert _in_child(lambda: {"nftables": [1]}) == {"nftables": [1]}
    assert _in_child(lambda: os.kill(os.getpid(), signal.SIGSEGV)) is None

    def refuse():
        raise KernelError("nftables refused")

    with pytest.raises(KernelError, match="refused"):
        _in_child(refuse)


@pytest.mark.parametrize("argv", [
    ["dispatch", "eth1", "up"], ["-v", "dispatch", "eth1", "pre-up"], ["--state-dir", "/x", "dispatch", "wlan0", "down"],
    ["--state-dir=/x", "-v", "dispatch", "tun0", "vpn-up"], ["--verbose", "dispatch", "dispatch", "up"],
])
def test_dispatch_is_read_as_the_parser_reads_it(argv) -> None:
    """The hook's fast path (no parser built) gives what the parser gives."""
    from nm_policy_routing.cli import _dispatch_args

    fast, full = _dispatch_args(argv), build_parser().parse_args(argv)
    assert (fast.state_dir, fast.verbose, fast.command, fast.iface, fast.action, fast.func) == (
        full.state_dir, full.verbose, full.command, full.iface, full.action, full.func)


@pytest.mark.parametrize("argv", [
    ["dispatch", "eth1"], ["dispatch", "eth1", "up", "more"], ["dispatch", "-h"], ["dispatch", "eth1", "--x"],
    ["--state-dir", "dispatch", "eth1", "up"], ["status"], ["-x", "dispatch", "eth1", "up"], [],
])
def test_anything_else_is_left_to_the_parser(argv) -> None:
    from nm_policy_routing.cli import _dispatch_args

    assert _dispatch_args(argv) is None


@pytest.mark.parametrize("action,asks", [("pre-down", False), ("vpn-pre-down", False), ("down", True),
                                         ("vpn-down", True)])
def test_only_a_down_asks_networkmanager_whether_it_is_stale(tmp_path, monkeypatch, action, asks) -> None:
    """A pre-down removes the policy without a D-Bus round trip (it cannot be stale); a down
    asks, and keeps the policy of a connection NetworkManager reports active again."""
    from types import SimpleNamespace

    from nm_policy_routing import dispatch
    from nm_policy_routing.adapters.nmfacts import ACTIVATED
    from nm_policy_routing.reconcile import Result

    asked, removed = [], []

    def from_bus(uuid, with_facts):
        asked.append(uuid)
        return ACTIVATED, None

    monkeypatch.setattr(dispatch, "_from_bus", from_bus)
    engine = SimpleNamespace(directory=str(tmp_path), remove=lambda uuid: removed.append(uuid) or Result())
    outcome = dispatch.handle("eth1", action, {"CONNECTION_UUID": "u1", "CONNECTION_ID": "c"}, lambda: engine)
    assert asked == (["u1"] if asks else [])
    assert removed == ([] if asks else ["u1"]), outcome


def test_a_rebuild_on_pre_up_plans_the_connection_with_its_own_facts(tmp_path, monkeypatch) -> None:
    """A damaged record is rebuilt from every active connection; the one activating (pre-up) may
    show no addresses over D-Bus yet (1.52): the event's own facts for it, never its empty ones."""
    from types import SimpleNamespace

    from nm_policy_routing import dispatch
    from nm_policy_routing.adapters.nmfacts import ACTIVATING
    from nm_policy_routing.model import Address, Connection
    from nm_policy_routing.reconcile import Result

    policy = (("nm-policy-routing.enable", "yes"),)
    listed = [Connection(uuid="u1", id="svc", iface="eth1", user_data=policy),  # activating: no addresses yet
              Connection(uuid="u2", id="mgmt", iface="eth0", addresses=(Address("10.0.0.2", 24),), user_data=policy)]
    own = Connection(uuid="u1", id="svc", iface="eth1", addresses=(Address("10.0.1.2", 24),), gateway4="10.0.1.1",
                     user_data=policy)
    (tmp_path / "state.json").write_text('{"version": 1, "connections": "garbage"}')
    planned = []
    monkeypatch.setattr(dispatch, "_from_bus", lambda uuid, with_facts: (ACTIVATING, own))
    monkeypatch.setattr(dispatch, "_all_active", lambda: listed)
    engine = SimpleNamespace(directory=str(tmp_path), reconcile=lambda conns: planned.append(conns) or Result())
    outcome = dispatch.handle("eth1", "pre-up", {"CONNECTION_UUID": "u1", "CONNECTION_ID": "svc"}, lambda: engine)
    assert "rebuilt from 2 active connections" in outcome
    assert sorted(planned[0], key=lambda c: c.uuid) == [own, listed[1]]

