"""The CLI's door: a snapshot callable is read with the reconcile lock held."""

from __future__ import annotations

import fcntl
import os

from tests.unit.test_planner import conn
from tests.unit.test_reconcile import _FakeKernel


def test_the_snapshot_is_taken_under_the_lock_and_applied(tmp_path) -> None:
    from nm_policy_routing.reconcile import Engine

    kernel = _FakeKernel()
    engine = Engine(str(tmp_path), kernel_factory=lambda: kernel)
    seen = []

    def snapshot():
        fd = os.open(str(tmp_path / "lock"), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another door trying now
            seen.append("free")
        except BlockingIOError:
            seen.append("held")
        finally:
            os.close(fd)
        return [conn("a", "eth1", n=1, match="source")]

    result = engine.reconcile(snapshot)
    assert seen == ["held"]
    assert result.plan_of("a").status == "ok" and kernel.state.rules
    assert engine.reconcile(lambda: None).plan_of("a").status == "ok"  # None: the recorded ones again
