"""The daemon's memory of profiles (NetworkManagerBus.remember): a profile's user data is read
once and kept until NetworkManager signals an edit, its removal or its own restart; an answer
that was on its way when an edit was signalled is used for that event, never kept."""

import asyncio
from types import SimpleNamespace
from typing import Dict, Optional

from nm_policy_routing.adapters.networkmanager import NM, SETTINGS_CONN, NetworkManagerBus

PATH = "/org/freedesktop/NetworkManager/Settings/1"


class Profiles(NetworkManagerBus):
    """NetworkManager's profiles as a dict, its signals delivered as dbus-next delivers them:
    to the message handlers, before the caller of a pending call resumes."""

    def __init__(self) -> None:
        super().__init__()
        self.store: Dict[str, Dict[str, str]] = {PATH: {"nm-policy-routing.table": "100"}}
        self.handlers = []
        self.asked = 0
        self.edit_while_answering: Optional[Dict[str, str]] = None

    def on_message(self, handler) -> None:
        self.handlers.append(handler)

    async def add_match(self, rule: str) -> None:
        pass

    async def settings(self, path: str):
        self.asked += 1
        answer = {"user": {"data": dict(self.store[path])}}
        if self.edit_while_answering is not None:  # edited right after NetworkManager answered
            self.edit(path, self.edit_while_answering)
            self.edit_while_answering = None
        await asyncio.sleep(0)
        return answer

    def edit(self, path: str, data: Dict[str, str], member: str = "Updated") -> None:
        self.store[path] = data
        self.signal(signal(interface=SETTINGS_CONN, member=member, path=path, body=[]))

    def signal(self, msg) -> None:
        for handler in self.handlers:
            handler(msg)


def signal(sender: str = ":1.5", **fields) -> SimpleNamespace:
    """A signal as dbus-next hands it to the message handlers."""
    return SimpleNamespace(reply_serial=None, error_name=None, sender=sender, **fields)


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_without_remember_every_event_reads_the_profile() -> None:
    nm = Profiles()
    assert run(nm.user_data(PATH)) == run(nm.user_data(PATH)) == {"nm-policy-routing.table": "100"}
    assert nm.asked == 2


def test_kept_until_an_edit_or_removal_is_signalled() -> None:
    nm = Profiles()
    run(nm.remember())
    assert run(nm.user_data(PATH)) == {"nm-policy-routing.table": "100"}
    assert run(nm.user_data(PATH)) == {"nm-policy-routing.table": "100"}
    assert nm.asked == 1
    nm.edit(PATH, {"nm-policy-routing.table": "200"})
    assert run(nm.user_data(PATH)) == {"nm-policy-routing.table": "200"}
    nm.edit(PATH, {"nm-policy-routing.table": "300"}, member="Removed")
    assert run(nm.user_data(PATH)) == {"nm-policy-routing.table": "300"}
    assert nm.asked == 3


def test_an_answer_overtaken_by_an_edit_is_not_kept() -> None:
    nm = Profiles()
    run(nm.remember())
    nm.edit_while_answering = {"nm-policy-routing.table": "200"}
    assert run(nm.user_data(PATH)) == {"nm-policy-routing.table": "100"}  # what NetworkManager said then
    assert run(nm.user_data(PATH)) == {"nm-policy-routing.table": "200"}
    assert nm.asked == 2


def test_networkmanager_restarting_forgets_everything() -> None:
    nm = Profiles()
    run(nm.remember())
    run(nm.user_data(PATH))
    nm.store[PATH] = {"nm-policy-routing.table": "400"}  # (a new NetworkManager, other profiles)
    nm.signal(signal(interface="org.freedesktop.DBus", member="NameOwnerChanged", path="/",
                     body=[NM, ":1.5", ":1.9"], sender="org.freedesktop.DBus"))
    assert run(nm.user_data(PATH)) == {"nm-policy-routing.table": "400"}
    assert nm.asked == 2


def test_a_caller_changing_its_copy_does_not_change_what_is_kept() -> None:
    nm = Profiles()
    run(nm.remember())
    run(nm.user_data(PATH))["nm-policy-routing.table"] = "999"
    assert run(nm.user_data(PATH)) == {"nm-policy-routing.table": "100"}
