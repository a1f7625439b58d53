"""The daemon follows systemd's unit jobs for the apps that wait for their cgroup."""

from types import SimpleNamespace

from dbus_next import MessageType

from nm_policy_routing.daemon import SYSTEMD_MANAGER, Daemon


def test_the_daemon_re_syncs_when_a_listed_unit_that_waited_starts() -> None:
    """systemd's JobRemoved for a unit that a policy lists and that waited for its cgroup (from
    systemd only, and only a finished start): one re-sync, which marks its sockets."""
    engine = SimpleNamespace(waiting_apps=frozenset({"unit:late.scope"}), keep_kernel=lambda factory: None)
    daemon = Daemon(engine)
    daemon._systemd = ":1.3"
    asked = []
    daemon.schedule = asked.append

    def job(unit: str, result: str = "done", sender: str = ":1.3"):
        return SimpleNamespace(sender=sender, body=[7, "/org/freedesktop/systemd1/job/7", unit, result],
                               interface=SYSTEMD_MANAGER, member="JobRemoved")
    for msg in (job("other.scope"), job("late.scope", "failed"), job("late.scope", sender=":1.99")):
        daemon._unit_done(msg)
    assert asked == []
    daemon._unit_done(job("late.scope"))
    assert asked == ["unit late.scope started"]


def test_systemd_re_executing_itself_is_followed_under_its_new_bus_name() -> None:
    engine = SimpleNamespace(waiting_apps=frozenset({"unit:late.scope"}), keep_kernel=lambda factory: None)
    daemon = Daemon(engine)
    daemon._systemd = ":1.3"
    asked = []
    daemon.schedule = asked.append
    for old, new in ((":1.3", ""), ("", ":1.40")):  # daemon-reexec: it leaves the bus, then comes back
        daemon._on_message(SimpleNamespace(message_type=MessageType.SIGNAL, member="NameOwnerChanged",
                                           sender="org.freedesktop.DBus", interface="org.freedesktop.DBus",
                                           body=["org.freedesktop.systemd1", old, new]))
    daemon._unit_done(SimpleNamespace(sender=":1.3", body=[7, "/j/7", "late.scope", "done"]))
    assert asked == [], "the old name is not believed"
    daemon._unit_done(SimpleNamespace(sender=":1.40", body=[8, "/j/8", "late.scope", "done"]))
    assert asked == ["unit late.scope started"]
