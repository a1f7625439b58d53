"""model.dataclass behaves as dataclasses.dataclass does for the core's classes."""

from __future__ import annotations

import dataclasses
from typing import List

import pytest

from nm_policy_routing.model import (Address, ConnectionPlan, Connection, FrozenInstanceError, KernelState, Rule,
                                     dataclass, field, replace)


@dataclass(frozen=True, order=True)
class Ours:
    a: int
    b: str = "x"
    c: tuple = ()


@dataclasses.dataclass(frozen=True, order=True)
class Theirs:
    a: int
    b: str = "x"
    c: tuple = ()


@dataclass
class Mutable:
    items: List[int] = field(default_factory=list)
    hidden: str = field(default="h", repr=False)

    def __post_init__(self) -> None:
        self.seen = len(self.items)


@pytest.mark.parametrize("args,kwargs", [((1,), {}), ((1, "y"), {}), ((1,), {"c": (2,)}), ((), {"a": 3, "b": "z"}),
                                         ((1, "y", (3,)), {})])
def test_same_values_order_hash_and_repr_as_the_standard_dataclass(args, kwargs) -> None:
    ours, theirs = Ours(*args, **kwargs), Theirs(*args, **kwargs)
    assert repr(ours) == repr(theirs).replace("Theirs", "Ours")
    assert hash(ours) == hash(theirs) and ours == Ours(*args, **kwargs) and ours != Ours(9)
    others = [Ours(0), Ours(1, "a"), Ours(1, "y", (9,)), Ours(5)]
    assert [o < ours for o in others] == [Theirs(o.a, o.b, o.c) < theirs for o in others]
    assert sorted(others + [ours]) == sorted([ours] + others, key=lambda o: (o.a, o.b, o.c))
    assert ours != theirs and Ours(1) != (1, "x", ())


@pytest.mark.parametrize("make", [lambda: Ours(), lambda: Ours(1, a=1), lambda: Ours(1, d=2),
                                  lambda: Ours(1, "x", (), 4), lambda: Rule(4, 1)])
def test_wrong_arguments_raise_type_error(make) -> None:
    with pytest.raises(TypeError):
        make()


def test_frozen_defaults_factories_post_init_and_replace() -> None:
    ours = Ours(1)
    with pytest.raises(FrozenInstanceError):
        ours.a = 2
    with pytest.raises(AttributeError):
        del ours.b
    assert Ours.b == "x" and vars(ours) == {"a": 1, "b": "x", "c": ()}
    first, second = Mutable(), Mutable([1, 2])
    first.items.append(1)
    assert Mutable().items == [] and second.seen == 2 and repr(second) == "Mutable(items=[1, 2])"
    assert replace(ours, b="y") == Ours(1, "y") and replace(second, hidden="z").hidden == "z"
    with pytest.raises(TypeError):
        hash(first)
    plan = ConnectionPlan(Connection("u", "c", "eth0", (Address.parse("10.0.0.2/24"),)), None)
    assert plan.state == KernelState() and plan.status == "ok" and plan.state is not ConnectionPlan(plan.connection,
                                                                                                     None).state


def test_a_class_variable_is_not_a_field() -> None:
    from typing import ClassVar

    @dataclass(frozen=True)
    class WithClassVar:
        kind: ClassVar[str] = "k"
        a: int = 1

    assert WithClassVar(2).a == 2 and WithClassVar.kind == "k" and repr(WithClassVar()) == \
        "test_a_class_variable_is_not_a_field.<locals>.WithClassVar(a=1)"
