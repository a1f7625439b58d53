"""Batched rtnetlink writes: many requests per send, each entry's error mapped back to it."""

from __future__ import annotations

import json

import pytest

from tests.lab.netns import PYTHON, Lab

pytestmark = pytest.mark.kernel

SCRIPT = r'''
import json
from nm_policy_routing.adapters.rtnl import WINDOW, Rtnl
from nm_policy_routing.model import Rule

# every third rule names an interface longer than the kernel takes: refused, the others added
rules = [Rule(4, 1000 + i, 100 + i, iif=("x" * 20 if i % 3 == 0 else f"v{i}")) for i in range(2 * WINDOW + 44)]
rtnl = Rtnl()
added = rtnl.add_rules(rules)
held = sorted(r.priority - 1000 for r in Rtnl().our_rules())
again = rtnl.add_rules(rules)  # those already there: fine
gone = rtnl.del_rules(rules)
twice = rtnl.del_rules(rules[1:])  # no longer there: fine
print(json.dumps({
    "count": len(rules),
    "refused": [i for i, e in enumerate(added) if e is not None],
    "message": next(str(e) for e in added if e is not None),
    "held": held,
    "again": [i for i, e in enumerate(again) if e is not None],
    "deleted": [i for i, e in enumerate(gone) if e is not None],
    "left": len(Rtnl().our_rules()),
    "twice": [i + 1 for i, e in enumerate(twice) if e is not None],
}))
'''


def test_each_entry_of_a_batch_gets_its_own_answer(lab: Lab) -> None:
    ns = lab.ns("rtnl")
    proc = ns.run(PYTHON, "-c", SCRIPT, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    bad = [i for i in range(out["count"]) if i % 3 == 0]
    assert out["refused"] == bad and out["again"] == bad, out
    assert out["held"] == [i for i in range(out["count"]) if i % 3], "exactly the others are in the kernel"
    assert out["message"].startswith("the kernel refused to add -4 rule priority 1000 iif xxxxxxxxxxxxxxxxxxxx"), out
    assert out["deleted"] == bad and out["left"] == 0, out
    assert out["twice"] == bad[1:], "deleting a rule that is not there is fine"
