"""The reconcile loop's rollback, against a kernel held in memory (no root needed)."""

from __future__ import annotations

from nm_policy_routing.model import ForeignUsage
from tests.unit.test_planner import conn


class _FakeKernel:
    """A kernel in memory whose nft refuses every change (for the rollback path)."""

    nft_exists, nft_intact = False, True

    def __init__(self) -> None:
        from nm_policy_routing.model import KernelState

        self.state = KernelState()

    def read(self, slots):
        return self.state

    def read_sysctl(self, family, iface, key):
        return 0

    def foreign(self):
        return ForeignUsage()

    def unusable_addresses(self, iface=None):
        return set()

    def write_sysctl(self, entry):
        pass

    def _change(self, kind, entry, add):
        from nm_policy_routing.model import replace

        entries = getattr(self.state, kind)
        self.state = replace(self.state, **{kind: entries | {entry} if add else entries - {entry}})

    def add_route(self, r):
        self._change("routes", r, True)

    def del_route(self, r):
        self._change("routes", r, False)

    def add_rule(self, r):
        self._change("rules", r, True)

    def del_rule(self, r):
        self._change("rules", r, False)

    def set_marks(self, marks):
        from nm_policy_routing.errors import KernelError

        raise KernelError("nftables refused")

    def flush_conntrack(self, mark):
        pass

    def close(self):
        pass


def test_nft_refusal_rolls_back_the_change_and_keeps_what_was_there(tmp_path) -> None:
    from nm_policy_routing.reconcile import Engine

    kernel = _FakeKernel()
    engine = Engine(str(tmp_path), kernel_factory=lambda: kernel)
    first = engine.reconcile([conn("a", "eth1", n=1, match="source")])  # no marks: no nft
    assert first.plan_of("a").status == "ok"
    kept = kernel.state
    second = engine.reconcile([conn("a", "eth1", n=1, match="source"), conn("b", "eth2", n=2)])
    assert second.plan_of("b").status == "error" and "nftables refused" in second.plan_of("b").errors[0]
    assert second.plan_of("a").status == "ok"
    assert kernel.state == kept, "connection a's policy stays; nothing of b is left"
