"""Element-by-element changes of our nft table end exactly where a fresh build would, committed by
libnftables or spoken directly (adapters/nftraw.py, the daemon's one-connection path)."""

from __future__ import annotations

import json

import pytest

from tests.lab.netns import PYTHON, Lab

pytestmark = pytest.mark.kernel

# in the namespace: walk through mark sets by deltas; print each step's listing and a fresh build's
SCRIPT = r'''
import json, sys
import nftables
from nm_policy_routing import nftdelta, nftjson
from nm_policy_routing.adapters.nftraw import NftBatch, Unsupported
from nm_policy_routing.nftdelta import MarkIndex
from nm_policy_routing.model import Mark

nft = nftables.Nftables()
nft.set_json_output(True)
LIST = {"nftables": [{"list": {"table": {"family": "inet", "name": "nm_policy_routing"}}}]}

def run(cmd):
    rc, out, err = nft.json_cmd(cmd)
    assert rc == 0, err
    return out

def canonical(listing):
    items = []
    for item in listing["nftables"]:
        for kind, obj in item.items():
            if kind == "metainfo":
                continue
            obj = {k: v for k, v in obj.items() if k != "handle"}
            if "elem" in obj:
                obj["elem"] = sorted(json.dumps(e, sort_keys=True) for e in obj["elem"])
            items.append(json.dumps({kind: obj}, sort_keys=True))
    return sorted(items)

raw, partial, steps = json.load(sys.stdin)
steps = [[Mark(*m) for m in step] for step in steps]
spoken = []

def commit(change):
    """As the resident kernel does: nfnetlink directly, libnftables for shapes nftraw does not encode."""
    if raw:
        try:
            NftBatch().commit(change)
            spoken.append(True)
            return
        except Unsupported:
            pass
    spoken.append(False)
    run(change)
run(nftjson.replace_table(steps[0], False))
out = []
for before, after in zip(steps, steps[1:]):
    if partial:  # as the daemon's one-connection path: only the part concerned, the shapes from the index
        view = MarkIndex(before)
        now, later, kept = view.change(set(before), set(after))
        change = nftdelta.delta(now, later, skeleton_kept=kept,
                                shapes=(view.samples(), view.samples(now - later, later - now)))
    else:
        change = nftdelta.delta(before, after)
    if change is None:
        run(nftjson.replace_table(after, True))
    elif change["nftables"]:
        commit(change)
    by_delta = run(LIST)
    marks, intact = nftjson.parse_table(by_delta)
    run(nftjson.replace_table(after, True))
    fresh = run(LIST)
    out.append({"delta": change is not None, "raw": bool(spoken and spoken.pop()), "marks_ok": marks == set(after), "intact": intact,
                "same_as_fresh": canonical(by_delta) == canonical(fresh)})
print(json.dumps(out))
'''

M = 0xFF000000
STEPS = [
    [("incoming", "eth1", 0x01000000, M)],
    [("incoming", "eth1", 0x01000000, M), ("incoming", "eth2", 0x02000000, M)],     # one more connection
    [("incoming", "eth1", 0x01000000, M), ("incoming", "eth2", 0x02000000, M),
     ("outgoing", "eth2", 0x02000000, M)],                                          # a direction added
    [("incoming", "eth1", 0x01000000, M), ("outgoing", "eth2", 0x02000000, M)],     # incoming dropped
    [("incoming", "eth1", 0x03000000, M), ("outgoing", "eth2", 0x02000000, M)],     # same iface, new mark
    [("outgoing", "eth2", 0x02000000, M)],                                          # no incoming left
    [("incoming", "eth1", 0x03000000, M)],                                          # no outgoing left
    [("incoming", "eth1", 0x03000000, M), ("incoming", "eth9", 0x1, 0xFFFFFFFF)],   # a new mask: replace
    [("incoming", "eth9", 0x1, 0xFFFFFFFF)],
    [("incoming", "eth9", 0x1, 0xFFFFFFFF), ("outgoing", "eth8", 0x2, 0xFFFFFFFF)],  # a mark without mask
]


@pytest.mark.parametrize("raw, partial", [(False, False), (True, False), (True, True)],
                         ids=["libnftables", "nfnetlink", "nfnetlink, the part concerned"])
def test_deltas_end_as_a_fresh_build(lab: Lab, raw: bool, partial: bool) -> None:
    ns = lab.ns("nft")
    proc = ns.run(PYTHON, "-c", SCRIPT, input=json.dumps([raw, partial, STEPS]), check=False)
    assert proc.returncode == 0, proc.stderr
    steps = json.loads(proc.stdout)
    assert [s["delta"] for s in steps] == [True, True, True, True, True, True, False, False, True]
    # nfnetlink speaks every delta: the element changes, and a direction appearing or going (the base
    # chains' rules written anew)
    assert [s["raw"] for s in steps] == ([True, True, True, True, True, True, False, False, True] if raw
                                         else [False] * len(steps))
    for n, step in enumerate(steps, 1):
        assert step["marks_ok"] and step["intact"] and step["same_as_fresh"], (n, step)
