"""The record on disk: 0.2.0's single state.json is read as it is, one event's changes are
saved in one file of their own (state.d/), all or none, that loading applies in order (and
0.3.0's one file per entry before them), a full save folds them into state.json, and files
that name another state.json (an older process wrote it whole) are ignored and removed."""

from __future__ import annotations

import json
import os

from nm_policy_routing.model import Allocation, Fwmark
from nm_policy_routing.record import Record, allocation_to_json, damage
from nm_policy_routing.recordfiles import OVERLAYS, event_name, generation

SVC = "5e1f0000-0000-4000-8000-0000000000b1"
NEW = "5e1f0000-0000-4000-8000-0000000000c2"
#: written by 0.2.0's record.py (a service connection applied, its originals and outcome)
STATE_020 = (
    '{"allocations":{"5e1f0000-0000-4000-8000-0000000000b1":{"fwmark":[503316480,4278190080],"priority":14103,'
    '"table":14198}},"connections":{"5e1f0000-0000-4000-8000-0000000000b1":{"addresses":["10.0.1.2/24",'
    '"fd00:1::2/64"],"gateway4":"10.0.1.1","gateway6":"fd00:1::1","id":"service","iface":"eth1","type":"",'
    '"user_data":{"nm-policy-routing.enable":"yes","nm-policy-routing.rp-filter":"loose"},'
    '"uuid":"5e1f0000-0000-4000-8000-0000000000b1"}},"outcomes":{"5e1f0000-0000-4000-8000-0000000000b1":'
    '{"errors":[],"id":"service","iface":"eth1","status":"ok","time":1764300000.0}},"policies":'
    '{"b55b195b53b95214ac58b7211c07e823":{"apps":[],"enable":true,"family":"both","fwmark":null,'
    '"match":["incoming"],"priority":null,"routes":[],"rp_filter":"loose","src_valid_mark":true,"table":null}},'
    '"sysctls":{"ipv4/eth1/rp_filter":1,"ipv4/eth1/src_valid_mark":0},"version":1}'
)
ALLOC = Allocation(14300, 14400, Fwmark(0x1d000000, 0xFF000000))


def _overlays(tmp_path) -> list:
    folder = tmp_path / OVERLAYS
    return sorted(os.listdir(folder)) if folder.exists() else []


def _one_event(tmp_path) -> Record:
    """What the daemon's one-connection path does: a new connection, its allocation and originals,
    another's sysctl original restored."""
    (tmp_path / "state.json").write_text(STATE_020)
    record = Record.load(str(tmp_path))
    assert record.damaged is None and SVC in record.connections(), "0.2.0's record is read as it is"
    record.data["connections"][NEW] = dict(record.data["connections"][SVC], uuid=NEW, id="new", iface="eth2")
    record.data["allocations"][NEW] = allocation_to_json(ALLOC)
    record.data["sysctls"]["ipv4/eth2/src_valid_mark"] = 0
    record.data["sysctls"].pop("ipv4/eth1/rp_filter")
    record.save(changes_only=True)
    return record


def test_a_020_record_takes_one_events_changes_in_a_file_of_their_own(tmp_path) -> None:
    count = generation(str(tmp_path))
    _one_event(tmp_path)
    assert (tmp_path / "state.json").read_text() == STATE_020, "state.json is not rewritten per event"
    assert _overlays(tmp_path) == [event_name(count + 1)]
    saved = json.loads((tmp_path / OVERLAYS / event_name(count + 1)).read_text())
    assert [(e["section"], e["key"], "value" in e) for e in saved["entries"]] == [
        ("connections", NEW, True), ("allocations", NEW, True), ("sysctls", "ipv4/eth1/rp_filter", False),
        ("sysctls", "ipv4/eth2/src_valid_mark", True)]
    assert generation(str(tmp_path)) == count + 1, "another process keeping the record sees the save"
    again = Record.load(str(tmp_path))
    assert again.damaged is None
    assert again.allocations() == {SVC: Allocation(14198, 14103, Fwmark(503316480, 4278190080)), NEW: ALLOC}
    assert again.connections()[NEW].iface == "eth2" and again.connections()[SVC].iface == "eth1"
    assert again.sysctl_originals() == {"ipv4/eth1/src_valid_mark": 0, "ipv4/eth2/src_valid_mark": 0}
    assert damage(json.loads((tmp_path / "state.json").read_text())) is None, "the base alone stays valid"


def test_a_full_save_folds_the_files_into_state_json(tmp_path) -> None:
    _one_event(tmp_path)
    record = Record.load(str(tmp_path))
    record.data["outcomes"].pop(SVC)
    record.save()
    assert _overlays(tmp_path) == [], "nothing is left beside state.json"
    whole = json.loads((tmp_path / "state.json").read_text())
    assert damage(whole) is None and set(whole["connections"]) == {SVC, NEW} and whole["outcomes"] == {}
    assert Record.load(str(tmp_path)).data == record.data


def test_files_naming_another_state_json_are_ignored_and_removed(tmp_path) -> None:
    _one_event(tmp_path)
    # an older process (0.2.0, during an upgrade) writes state.json whole from what it read
    older = json.loads(STATE_020)
    older["outcomes"][SVC]["status"] = "error"
    tmp = tmp_path / ".older"
    tmp.write_text(json.dumps(older))
    os.replace(tmp, tmp_path / "state.json")
    record = Record.load(str(tmp_path))
    assert record.damaged is None and set(record.connections()) == {SVC}, "its state.json wins"
    assert record.data["outcomes"][SVC]["status"] == "error"
    record.data["outcomes"][SVC] = dict(record.data["outcomes"][SVC], status="ok")
    record.save(changes_only=True)
    assert _overlays(tmp_path) == [event_name(generation(str(tmp_path)))], "the stale file is gone"
    assert Record.load(str(tmp_path)).data["outcomes"][SVC]["status"] == "ok"


def test_later_events_win_and_an_interrupted_save_leaves_none_of_its_event(tmp_path, monkeypatch) -> None:
    _one_event(tmp_path)
    record = Record.load(str(tmp_path))
    record.data["allocations"].pop(NEW)
    record.data["outcomes"][NEW] = {"errors": [], "id": "new", "iface": "eth2", "status": "ok", "time": 1.0}
    record.save(changes_only=True)
    again = Record.load(str(tmp_path))
    assert NEW not in again.allocations() and NEW in again.data["outcomes"], "the later event wins"
    # killed while saving the next event, at its second file rename: none of it, or all of it, is seen
    from nm_policy_routing import recordfiles

    renames, real_replace = [], os.replace

    def killed_at_second(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    again.data["connections"].pop(NEW)
    again.data["sysctls"].pop("ipv4/eth2/src_valid_mark")
    monkeypatch.setattr(recordfiles.os, "replace", killed_at_second)
    try:
        again.save(changes_only=True)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    after = Record.load(str(tmp_path))
    assert (NEW in after.connections()) == ("ipv4/eth2/src_valid_mark" in after.sysctl_originals()), \
        "an event is saved all or none"
    (tmp_path / OVERLAYS / ".state.event.000000000009.4242.4243").write_text('{"base": [')  # as a SIGKILL leaves it
    after.save()
    assert _overlays(tmp_path) == [], "a full save removes what an interrupted save left"


def test_a_030_record_with_one_file_per_entry_is_read_before_newer_events(tmp_path) -> None:
    (tmp_path / "state.json").write_text(STATE_020)
    st = os.stat(tmp_path / "state.json")
    base = [st.st_ino, st.st_size, st.st_mtime_ns]
    os.makedirs(tmp_path / OVERLAYS)
    for key, value in ((NEW, allocation_to_json(ALLOC)), (SVC, allocation_to_json(ALLOC))):  # as 0.3.0 wrote them
        (tmp_path / OVERLAYS / ("allocations." + key)).write_text(
            json.dumps({"base": base, "section": "allocations", "key": key, "value": value}))
    record = Record.load(str(tmp_path))
    assert record.damaged is None and record.allocations() == {SVC: ALLOC, NEW: ALLOC}
    record.data["allocations"].pop(NEW)
    record.save(changes_only=True)
    assert Record.load(str(tmp_path)).allocations() == {SVC: ALLOC}, "the newer event wins over 0.3.0's file"
    record.save()
    assert _overlays(tmp_path) == [] and Record.load(str(tmp_path)).allocations() == {SVC: ALLOC}


def test_a_damaged_entry_file_sets_the_whole_record_aside(tmp_path) -> None:
    _one_event(tmp_path)
    (tmp_path / OVERLAYS / _overlays(tmp_path)[0]).write_text("{not json")
    record = Record.load(str(tmp_path))
    assert record.damaged and "unreadable" in record.damaged and record.connections() == {}
    bad = json.loads(STATE_020)
    bad_entry = {"section": "allocations", "key": NEW, "value": {"table": 254, "priority": 1}}
    record.save()
    assert sorted(p.name.split(".damaged-")[0] for p in tmp_path.glob("*.damaged-*")) == ["state.d", "state.json"]
    assert _overlays(tmp_path) == [] and Record.load(str(tmp_path)).damaged is None
    # an entry file of the right shape holding a wrong value is damage too
    (tmp_path / "state.json").write_text(json.dumps(bad))
    st = os.stat(tmp_path / "state.json")
    bad_entry["base"] = [st.st_ino, st.st_size, st.st_mtime_ns]
    os.makedirs(tmp_path / OVERLAYS, exist_ok=True)
    (tmp_path / OVERLAYS / ("allocations." + NEW)).write_text(json.dumps(bad_entry))
    assert "allocations" in Record.load(str(tmp_path)).damaged


def test_a_load_outside_the_lock_sees_a_full_save_whole(tmp_path, monkeypatch) -> None:
    """The daemon's re-sync, settle, status and the hook's damage check load without the lock:
    a full save by someone else (state.json replaced, then the entry files removed) must not be
    seen half-way (the old state.json without its entry files, or an entry file gone while read)."""
    import threading

    from nm_policy_routing import record as record_module
    from nm_policy_routing.record import locked

    _one_event(tmp_path)
    halfway, go_on, seen = threading.Event(), threading.Event(), {}
    real_unlink = os.unlink

    def slow_unlink(path, *args, **kwargs):  # the save stops after replacing state.json
        halfway.set()
        go_on.wait(5)
        return real_unlink(path, *args, **kwargs)

    def writer() -> None:
        with locked(str(tmp_path)):
            record = Record.load(str(tmp_path))
            record.data["outcomes"].pop(SVC)
            monkeypatch.setattr(record_module.os, "unlink", slow_unlink)
            record.save()

    def reader() -> None:
        loaded = Record.load(str(tmp_path))
        seen["damaged"], seen["connections"] = loaded.damaged, set(loaded.connections())
        seen["outcomes"] = set(loaded.data.get("outcomes", {}))

    w = threading.Thread(target=writer)
    w.start()
    assert halfway.wait(5), "the save reached its half-way point"
    r = threading.Thread(target=reader)
    r.start()
    r.join(0.3)
    assert r.is_alive(), "the load waits for the save in progress"
    go_on.set()
    w.join(5)
    r.join(5)
    monkeypatch.undo()
    assert seen == {"damaged": None, "connections": {SVC, NEW}, "outcomes": set()}, seen
