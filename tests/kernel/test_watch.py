"""The daemon's watches report others' changes and not its own (which its engine verifies)."""

from __future__ import annotations

import json

import pytest

from tests.lab.netns import PYTHON, Lab

pytestmark = pytest.mark.kernel

SCRIPT = r'''
import json, select, subprocess, threading
import nftables
from nm_policy_routing.adapters.nfnetlink import NftWatch
from nm_policy_routing.adapters.rtnl import Rtnl
from nm_policy_routing.adapters.rtnlwatch import RtnlWatch
from nm_policy_routing.model import Rule

def drain(watch, seconds=0.3):
    out = []
    while select.select([watch.sock], [], [], seconds)[0]:
        out += watch.events()
    return out

ours = Rtnl()
rtnl_watch = RtnlWatch(ignore_portid=lambda: ours.portid)
nft_watch = NftWatch(ignore_pid=threading.get_native_id)
rule = Rule(4, 1000, 100, 0x1, 0xffffffff)
result = {}
assert ours.add_rules([rule]) == [None]
assert ours.del_rules([rule]) == [None]
result["own rule changes"] = [e.text for e in drain(rtnl_watch)]
subprocess.run("ip rule add priority 1000 fwmark 0x1 table 100 proto 214; "
               "ip rule del priority 1000 fwmark 0x1 table 100 proto 214", shell=True, check=True)
result["others' rule changes"] = [(e.text, e.resync, e.rules) for e in drain(rtnl_watch)]
nft = nftables.Nftables()
assert nft.cmd("add table inet nm_policy_routing")[0] == 0
assert nft.cmd("delete table inet nm_policy_routing")[0] == 0
result["own nft batches"] = drain(nft_watch)
subprocess.run(["nft", "add table inet nm_policy_routing; delete table inet nm_policy_routing"], check=True)
result["others' nft batches"] = drain(nft_watch)
print(json.dumps(result))
'''


def test_watches_skip_only_our_own_changes(lab: Lab) -> None:
    ns = lab.ns("watch")
    proc = ns.run(PYTHON, "-c", SCRIPT, check=False)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["own rule changes"] == []
    assert ["RTM_DELRULE of ours", True, True] in seen["others' rule changes"]
    assert seen["own nft batches"] == []
    assert ["newtable", "nm_policy_routing"] in seen["others' nft batches"]
    assert ["deltable", "nm_policy_routing"] in seen["others' nft batches"]
