"""Run one engine operation in the current namespace: JSON request on stdin, JSON result out.

{"op": "reconcile"|"ensure"|"remove"|"flush"|"inspect", "connections": [...], "connection": {...}, "uuid": "..."}
Used by the kernel tests through ``ip netns exec``, so the engine runs for real inside a namespace.
"""

import json
import sys

from nm_policy_routing.errors import PolicyRoutingError
from nm_policy_routing.reconcile import Engine
from nm_policy_routing.record import connection_from_json


def main() -> int:
    req = json.load(sys.stdin)
    engine = Engine(req.get("state_dir"))
    op = req["op"]
    try:
        if op == "reconcile":
            res = engine.reconcile([connection_from_json(c) for c in req["connections"]])
        elif op == "ensure":
            res = engine.ensure(connection_from_json(req["connection"]))
        elif op == "remove":
            res = engine.remove(req["uuid"])
        elif op == "flush":
            res = engine.flush()
        elif op == "inspect":
            found = engine.inspect()
            json.dump({"drift": found.drift, "stray": found.stray}, sys.stdout)
            return 0
        else:
            raise SystemExit(f"unknown op {op}")
    except PolicyRoutingError as exc:
        json.dump({"exception": type(exc).__name__, "message": str(exc)}, sys.stdout)
        return 1
    out = {
        "changes": res.changes,
        "plans": {
            cp.connection.uuid: {
                "status": cp.status,
                "errors": list(cp.errors),
                "allocation": None if not cp.allocation else {
                    "table": cp.allocation.table, "priority": cp.allocation.priority,
                    "fwmark": None if not cp.allocation.fwmark else
                    [cp.allocation.fwmark.value, cp.allocation.fwmark.mask]},
            }
            for cp in res.plans
        },
    }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
