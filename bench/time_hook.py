"""Run inside the host namespace: time a hook script per event, N times each (stdlib only).

usage: time_hook.py HOOK N [ACTION...]  (environment: the event's variables, as the dispatcher
passes them; actions default to up down, run in that order N times)
prints JSON {"up": [seconds...], "down": [...], ...}
"""

import json
import os
import subprocess
import sys
import time


def main() -> None:
    hook, count = sys.argv[1], int(sys.argv[2])
    actions = sys.argv[3:] or ["up", "down"]
    env = dict(os.environ)
    out = {action: [] for action in actions}
    for _ in range(count):
        for action in actions:
            env["NM_DISPATCHER_ACTION"] = action
            start = time.perf_counter()
            subprocess.run([hook, "eth1", action], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
            out[action].append(time.perf_counter() - start)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
