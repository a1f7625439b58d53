"""Injectable fault points, for tests that kill a process in the middle of an apply.

``NM_POLICY_ROUTING_FAULT_AT=N`` makes the process SIGKILL itself at the N-th fault
point it reaches (each kernel write and each record save is one). Unset, a fault
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

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
