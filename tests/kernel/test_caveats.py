"""Settings that say applied but do nothing: status and the apply log say so, and why.

Each case is shown with the kernel first (the setting really has no effect, with
traffic or the kernel's counters), then with what ``status`` and the apply log say.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Tuple

import pytest

from tests.conftest import ENGINE_CALL, connection
from tests.lab.netns import PYTHON, Netns, Seed

pytestmark = pytest.mark.kernel

SVC = "5e1f0000-0000-4000-8000-000000000001"
CLI = os.path.join(os.path.dirname(sys.executable), "nm-policy-routing")


def service(**policy: str) -> Dict[str, Any]:
    values = dict(enable="yes", table="100", fwmark="0x1", priority="1000")
    values.update(policy)
    return connection(SVC, "eth1", ["10.0.1.2/24", "fd00:1::2/64"], "10.0.1.1", "fd00:1::1", **values)


def apply(host: Netns, state_dir: str, conn: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """The engine's reconcile in the host namespace: (result, what it logged)."""
    req = json.dumps({"op": "reconcile", "state_dir": state_dir, "connections": [conn]})
    proc = host.run(PYTHON, ENGINE_CALL, input=req, check=False)
    return json.loads(proc.stdout), proc.stderr


def status(host: Netns, state_dir: str) -> Tuple[List[str], str]:
    """(warnings of our connection in ``status --json``, the human text)."""
    env = {**os.environ, "NM_POLICY_ROUTING_STATE_DIR": state_dir,
           "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/bus"}
    rows = json.loads(host.run(CLI, "status", "--json", env=env).stdout)["connections"]
    text = host.run(CLI, "status", env=env).stdout
    return next(r for r in rows if r["uuid"] == SVC)["warnings"], text


def rp_drops(host: Netns) -> int:
    out = host.run("nstat", "-az", "TcpExtIPReversePathFilter").stdout.split()
    return int(out[out.index("TcpExtIPReversePathFilter") + 1])


def test_rp_filter_off_under_a_higher_conf_all(seed: Seed, state_dir: str) -> None:
    host = seed.host
    assert host.sysctl("net.ipv4.conf.all.rp_filter") == 1  # the seed's (RHEL's) default
    # 'outgoing' only: arriving packets carry no mark, so rp_filter decides alone
    result, log = apply(host, state_dir, service(match="outgoing", rp_filter="off"))
    assert result["plans"][SVC]["status"] == "ok", result
    assert host.conf("ipv4", "eth1", "rp_filter") == 0
    before = rp_drops(host)
    seed.ping(Seed.SERVICE4)
    assert rp_drops(host) > before, "eth1 still filters strictly: rp-filter=off has no effect"
    warnings, text = status(host, state_dir)
    assert len(warnings) == 1 and "rp-filter=off has no effect on eth1" in warnings[0], warnings
    assert "net.ipv4.conf.all.rp_filter (1)" in warnings[0] and "filters strict" in warnings[0]
    assert "warning: rp-filter=off has no effect on eth1" in text
    assert f"connection 'conn-eth1' ({SVC}) on eth1: rp-filter=off has no effect" in log, log

    host.sysctl("net.ipv4.conf.all.rp_filter", 0)
    before = rp_drops(host)
    seed.ping(Seed.SERVICE4)
    assert rp_drops(host) == before, "with conf.all lowered, rp-filter=off takes effect"
    assert status(host, state_dir)[0] == []

    host.sysctl("net.ipv4.conf.all.rp_filter", 2)
    result, log = apply(host, state_dir, service(match="outgoing", rp_filter="strict"))
    assert "rp-filter=strict has no effect on eth1" in log and "filters loose" in log, log


FIREWALLD = ("nft add table inet firewalld; "
             "nft add chain inet firewalld filter_PREROUTING '{ type filter hook prerouting priority -290; }'; "
             "nft add rule inet firewalld filter_PREROUTING meta nfproto ipv6 fib saddr . mark . iif oif missing drop")


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "loose"])
def test_firewalld_ipv6_rpfilter_before_our_marking(seed: Seed, state_dir: str, strict: bool) -> None:
    host = seed.host
    host.sh(FIREWALLD if strict else FIREWALLD.replace(". iif ", ""))
    result, log = apply(host, state_dir, service())
    assert result["plans"][SVC]["status"] == "ok", result
    assert seed.tcp(Seed.SERVICE4), "IPv4 is not filtered"
    assert seed.tcp(Seed.SERVICE6) is not strict, "the strict filter drops IPv6 before we mark it"
    warnings, _ = status(host, state_dir)
    if not strict:
        assert warnings == []
        return
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("IPv6 packets arriving on eth1") and \
        "firewalld (nft table inet firewalld (chain filter_PREROUTING))" in warnings[0], warnings
    assert "IPv6 packets arriving on eth1" in log
    # the remedy it names: match=source does not depend on marks
    apply(host, state_dir, service(match="source"))
    assert seed.tcp(Seed.SERVICE6)
    assert status(host, state_dir)[0] == []


def test_foreign_writers_of_our_mark_bits(seed: Seed, state_dir: str) -> None:
    host = seed.host
    result, log = apply(host, state_dir, service())
    assert result["plans"][SVC]["status"] == "ok", result
    assert seed.tcp(Seed.SERVICE4)
    assert status(host, state_dir)[0] == []
    # a constant writer after our marking: the policy says applied, the seed is broken again
    host.sh("nft add table inet other; "
            "nft add chain inet other pre '{ type filter hook prerouting priority -140; }'; "
            "nft add rule inet other pre iifname eth1 meta mark set 0x100; "
            "nft add rule inet other pre iifname eth9 meta mark set ct mark")
    assert not seed.tcp(Seed.SERVICE4), "the foreign constant overwrote our mark"
    host.run("iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-i", "eth9", "-j", "MARK", "--set-mark", "0x4")
    warnings, text = status(host, state_dir)
    owners = sorted(w.split(" can be overwritten by ")[1].split(", which")[0] for w in warnings)
    assert owners == ["nft table inet other (chain pre): meta mark set 0x100",
                      "nft table inet other (chain pre): meta mark set ct mark",
                      "nft table ip mangle (chain PREROUTING): iptables-nft target MARK (its mask is not visible)"], \
        warnings
    assert all(w.startswith("fwmark 0x1/0xffffffff can be overwritten by") for w in warnings)
    assert text.count("    warning: fwmark 0x1/0xffffffff can be overwritten") == 3
    _, log = apply(host, state_dir, service(priority="1001"))
    assert "can be overwritten by nft table inet other (chain pre): meta mark set 0x100" in log


def test_masked_foreign_write_claims_the_bits_it_clears(seed: Seed, state_dir: str) -> None:
    host = seed.host
    # keeps 0xffff00ff, sets 0x100: it writes (clears) all of 0xff00, not only 0x100
    host.sh("nft add table inet pbr; "
            "nft add chain inet pbr pre '{ type filter hook prerouting priority -140; }'; "
            "nft add rule inet pbr pre meta mark set meta mark and 0xffff00ff or 0x100")
    result, _ = apply(host, state_dir, service(fwmark="0x200/0x200"))
    plan = result["plans"][SVC]
    assert plan["status"] == "conflict", plan
    assert "mark bits 0x200 are used by nft table inet pbr (chain pre)" in plan["errors"][0], plan
    assert not seed.host.ipj("-4", "rule", "show", "table", "100"), "nothing installed"
