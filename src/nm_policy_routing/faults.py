"""Injectable fault and pause points, for tests that kill or stop a process mid-way.

``NM_POLICY_ROUTING_FAULT_AT=N`` makes the process SIGKILL itself at the N-th fault
point it reaches (each kernel write and each record save is one).
``NM_POLICY_ROUTING_PAUSE_AT=NAME:PATH`` makes it stop at the pause point NAME: it
creates ``PATH.paused`` and waits until ``PATH`` exists (a test orders two doors so).
Unset, each point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

_count = 0


def fault_point(name: str) -> None:
    global _count
    target = os.environ.get("NM_POLICY_ROUTING_FAULT_AT")
    if not target:
        return
    _count += 1
    if str(_count) == target:
        os.write(2, f"fault point {_count} ({name}): killing myself\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def pause_point(name: str) -> None:
    spec = os.environ.get("NM_POLICY_ROUTING_PAUSE_AT")
    if not spec:
        return
    point, _, path = spec.partition(":")
    if point != name or not path:
        return
    with open(path + ".paused", "w"):
        pass
    while not os.path.exists(path):
        time.sleep(0.01)
