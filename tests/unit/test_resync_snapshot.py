"""A full re-sync against the events that acted while it read NetworkManager: a connection an
event decided with facts read after the re-sync's snapshot began is taken as that event left
it (recorded, or gone); the older snapshot does not undo a pre-up or a pre-down."""

from types import SimpleNamespace

from nm_policy_routing.daemon import Daemon
from nm_policy_routing.reconcile import Engine
from nm_policy_routing.record import Record
from tests.unit.test_planner import conn


def daemon(tmp_path, recorded, decided):
    engine = Engine(str(tmp_path))
    record = Record.load(engine.directory)
    record.set_connections({c.uuid: c for c in recorded})
    record.save()
    d = Daemon(engine)
    d.targeted = SimpleNamespace(decided=decided)
    return d


def test_a_pre_up_after_the_snapshot_began_is_kept(tmp_path) -> None:
    service = conn("u-service", "eth1", table="100")
    d = daemon(tmp_path, [service], {"u-service": 11.0})
    assert d._newer_events([], since=10.0) == [service]  # the snapshot saw it not yet active


def test_a_pre_down_after_the_snapshot_began_is_not_undone(tmp_path) -> None:
    service, other = conn("u-service", "eth1"), conn("u-other", "eth2", n=2)
    d = daemon(tmp_path, [other], {"u-service": 11.0})  # its pre-down removed it from the record
    assert d._newer_events([service, other], since=10.0) == [other]


def test_a_snapshot_newer_than_the_event_wins(tmp_path) -> None:
    old = conn("u-service", "eth1", table="100")
    edited = conn("u-service", "eth1", table="200")  # a profile edit: the re-sync read it after
    d = daemon(tmp_path, [old], {"u-service": 9.0})
    assert d._newer_events([edited], since=10.0) == [edited]
