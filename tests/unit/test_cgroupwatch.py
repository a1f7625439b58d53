"""The daemon's watch for cgroup directories listed in apps that do not exist yet: inotify on the
deepest existing ancestor, re-armed one level deeper at each new directory (any filesystem
notifies mkdir alike; the booted machine of ./run machine-test checks it on cgroup2)."""

import select

from nm_policy_routing.adapters.cgroupwatch import CgroupWatch


def readable(watch: CgroupWatch) -> bool:
    return bool(select.select([watch.fd], [], [], 1.0)[0])


def test_it_says_when_a_waited_directory_appears_two_levels_down(tmp_path) -> None:
    wanted = tmp_path / "a.slice" / "late"
    watch = CgroupWatch()
    try:
        assert watch.arm([str(wanted)]) is False
        (tmp_path / "other").mkdir()
        assert readable(watch) and watch.appeared() is False, "another directory: nothing yet"
        (tmp_path / "a.slice").mkdir()
        assert readable(watch) and watch.appeared() is False, "its parent: watched deeper now"
        wanted.mkdir()
        assert readable(watch) and watch.appeared() is True
        assert watch.arm([str(wanted)]) is True, "it exists: nothing to wait for"
        assert watch.arm([]) is False and watch.appeared() is False, "nothing waited for"
        (tmp_path / "a.slice" / "more").mkdir()
        assert not readable(watch), "no watch is left"
    finally:
        watch.close()
