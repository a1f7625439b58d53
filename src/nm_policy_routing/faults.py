"""Injectable fault and pause points, for tests that break or stop a process mid-way.

``NM_POLICY_ROUTING_FAULT_AT=N`` makes the process SIGKILL itself at the N-th fault
point it reaches (each kernel write and each record save is one);
``NM_POLICY_ROUTING_FAULT_AT=NAME`` (``route``, ``rule``, ``sysctl``, ``nft``, ``verify``,
...) at the first point of that name. With ``NM_POLICY_ROUTING_FAULT_ACTION=raise`` the
point raises a KernelError instead, as a kernel refusing that step (or, at ``verify``, a
concurrent change) would.
``NM_POLICY_ROUTING_PAUSE_AT=NAME:PATH`` makes it stop at the pause point NAME: it
creates ``PATH.paused`` and waits until ``PATH`` exists (a test orders two doors so).
Unset, each point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time

_count = 0
_fired = False


def fault_point(name: str) -> None:
    global _count, _fired
    target = os.environ.get("NM_POLICY_ROUTING_FAULT_AT")
    if not target:
        return
    _count += 1
    if _fired or (str(_count) != target and name != target):
        return
    _fired = True
    if os.environ.get("NM_POLICY_ROUTING_FAULT_ACTION") == "raise":
        from .errors import KernelError, VerifyError

        cls = VerifyError if name == "verify" else KernelError
        raise cls(f"injected fault at point {_count} ({name})")
    os.write(2, f"fault point {_count} ({name}): killing myself\n".encode())
    import signal

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
