"""The daemon's one-connection reconcile leaves the kernel exactly as the full reconcile would."""

from __future__ import annotations

import json

import pytest

from tests.lab.netns import PYTHON, Lab

pytestmark = pytest.mark.kernel

SCRIPT = r'''
import json, subprocess, sys, tempfile
from nm_policy_routing.adapters.resident import Resident
from nm_policy_routing.model import Address, Connection
from nm_policy_routing.reconcile import Engine
from nm_policy_routing.scoped import Scoped

def conn(i, host=2, **policy):
    user = {"nm-policy-routing.enable": "yes", **{f"nm-policy-routing.{k}": v for k, v in policy.items()}}
    return Connection(uuid=f"00000000-0000-4000-8000-{i:012d}", id=f"c{i}", iface=f"v{i}",
                      addresses=(Address.parse(f"10.9.{i}.{host}/24"), Address.parse(f"fd09:{i}::{host}/64")),
                      gateway4=f"10.9.{i}.1", gateway6=str(Address.parse(f"fd09:{i}::1/64").ip), user_data=tuple(sorted(user.items())))

def state():
    out = {}
    for fam in ("-4", "-6"):
        out["rules" + fam] = sorted(json.dumps(r, sort_keys=True) for r in json.loads(subprocess.run(
            ["ip", "-j", fam, "rule"], capture_output=True, text=True).stdout))
        out["routes" + fam] = sorted(json.dumps(r, sort_keys=True) for r in json.loads(subprocess.run(
            ["ip", "-j", fam, "route", "show", "table", "all", "proto", "214"], capture_output=True, text=True).stdout))
    nft = json.loads(subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True).stdout)
    items = []
    for item in nft["nftables"]:
        for kind, obj in item.items():
            if kind != "metainfo":
                obj = {k: v for k, v in obj.items() if k != "handle"}
                if "elem" in obj:
                    obj["elem"] = sorted(json.dumps(e, sort_keys=True) for e in obj["elem"])
                items.append(json.dumps({kind: obj}, sort_keys=True))
    out["nft"] = sorted(items)
    out["svm"] = [open(f"/proc/sys/net/ipv4/conf/v{i}/src_valid_mark").read() for i in range(6)]
    out["rpf"] = [open(f"/proc/sys/net/ipv4/conf/v{i}/rp_filter").read() for i in range(6)]
    return out

base = [conn(0), conn(1, match="incoming,source,outgoing"), conn(2, table="300", priority="3000"),
        conn(3, rp_filter="loose")]
steps = [
    ("a new connection up", base + [conn(4, match="incoming,outgoing", rp_filter="strict")], ("ensure", conn(4, match="incoming,outgoing", rp_filter="strict"))),
    ("its address changes", base + [conn(4, host=7, match="incoming,outgoing", rp_filter="strict")], ("ensure", conn(4, host=7, match="incoming,outgoing", rp_filter="strict"))),
    ("its policy disabled", base + [conn(4, host=7, enable="no")], ("ensure", conn(4, host=7, enable="no"))),
    ("another goes down", [base[0], base[2], base[3], conn(4, host=7, enable="no")], ("remove", base[1].uuid)),
    ("a connection with a table of its own comes back", [base[0], base[2], base[3], conn(4, host=7, enable="no"), base[1]], ("ensure", base[1])),
]
resident = Resident()
daemon = Engine(tempfile.mkdtemp())
daemon.keep_kernel(resident)
daemon.reconcile(base)
report = []
for name, everything, (op, arg) in steps:
    scoped = Scoped(daemon)
    result = scoped.ensure(arg) if op == "ensure" else scoped.remove(arg)
    by_scoped = state()
    reference = Engine(tempfile.mkdtemp())
    subprocess.run("nft delete table inet nm_policy_routing; ip -4 rule flush protocol 214; ip -6 rule flush protocol 214; "
                   "ip -4 route flush table all protocol 214; ip -6 route flush table all protocol 214", shell=True)
    for i in range(6):
        for key in ("src_valid_mark", "rp_filter"):
            open(f"/proc/sys/net/ipv4/conf/v{i}/{key}", "w").write("0\n")
    reference.reconcile(everything)
    by_full = state()
    diff = {k: (by_scoped[k], by_full[k]) for k in by_full if by_scoped[k] != by_full[k]}
    report.append({"step": name, "scoped": result is not None, "same": not diff, "diff": diff})
    # back to the daemon's own state for the next step, as the daemon would have it
    subprocess.run("nft delete table inet nm_policy_routing; ip -4 rule flush protocol 214; ip -6 rule flush protocol 214; "
                   "ip -4 route flush table all protocol 214; ip -6 route flush table all protocol 214", shell=True)
    for i in range(6):
        for key in ("src_valid_mark", "rp_filter"):
            open(f"/proc/sys/net/ipv4/conf/v{i}/{key}", "w").write("0\n")
    resident.forget_all()
    daemon.reconcile(everything)
print(json.dumps(report))
'''


def test_one_connection_changes_end_as_the_full_reconcile(lab: Lab) -> None:
    ns = lab.ns("scoped")
    script = "; ".join(f"ip link add v{i} type veth peer name p{i}; ip link set v{i} up; ip link set p{i} up; "
                       f"ip addr add 10.9.{i}.2/24 dev v{i}; ip addr add 10.9.{i}.7/24 dev v{i}; "
                       f"ip addr add fd09:{i}::2/64 dev v{i} nodad; ip addr add fd09:{i}::7/64 dev v{i} nodad"
                       for i in range(6))
    ns.sh(script)
    proc = ns.run(PYTHON, "-c", SCRIPT, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for step in json.loads(proc.stdout):
        assert step["scoped"], f"{step['step']}: fell back to the full reconcile"
        assert step["same"], step
