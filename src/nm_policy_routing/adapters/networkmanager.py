"""NetworkManager over D-Bus (dbus-next): connection facts, user data, signals.

The only module that imports the D-Bus library (dbus-next; dbus-fast is a drop-in
successor). Honours ``DBUS_SYSTEM_BUS_ADDRESS``. Everything is keyed by connection
UUID: object paths change when NetworkManager restarts. Every call has a timeout: a
hung bus or NetworkManager yields a NetworkManagerError, never a process that waits forever.
What the objects say about a connection is decided in nmfacts.py; this client answers its
requests (``drive``), as the hook's synchronous client (syncbus.py) does.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..errors import NetworkManagerError
from ..model import Connection
from . import nmfacts
from .nmmirror import OBJECT_MANAGER, ROOT, Mirror
from .nmfacts import (ACTIVATED, ACTIVATING, ACTIVATION_EXTERNAL, ACTIVE, CALL_TIMEOUT, CONNECT_TIMEOUT,  # noqa: F401
                      DEACTIVATED, DEACTIVATING, DEVICE, NM, NM_PATH, PROPS, SETTINGS_CONN, SETTINGS_PATH)

log = logging.getLogger(__name__)

UPDATE2_TO_DISK = 0x1
UPDATE2_NO_REAPPLY = 0x40


def _no_glib() -> None:
    """dbus-next's package imports its GLib flavour, which imports PyGObject when installed
    (~10-30 ms and a few MB): we use the asyncio flavour only. Called before importing it."""
    if "dbus_next" not in sys.modules:
        sys.modules.setdefault("gi", None)  # its 'import gi' then fails at once, as without PyGObject


def _plain(value: Any) -> Any:
    """Variants -> plain Python values, recursively."""
    from dbus_next import Variant  # (once per reply: a GetAll holds thousands of values)

    return _unwrap(value, Variant)


def _unwrap(value: Any, variant: type) -> Any:
    if isinstance(value, variant):
        return _unwrap(value.value, variant)
    if isinstance(value, dict):
        return {k: _unwrap(v, variant) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v, variant) for v in value]
    return value


class NetworkManagerBus:
    """An async client of NetworkManager on the system bus."""

    def __init__(self) -> None:
        self.bus = None
        #: with remember() (the daemon): settings path -> the profile's user data, kept until
        #: NetworkManager signals an edit; device path -> its last IP configurations' paths (hints,
        #: read with the connection and used only if it names them). None: everything read anew.
        self._profiles: Optional[Dict[str, Dict[str, str]]] = None
        self._configs: Dict[str, Tuple[str, ...]] = {}
        self._edits = 0  # how many edits were signalled (a reply started before one is not kept)
        #: with remember(): NetworkManager's objects as its signals describe them (nmmirror.py)
        self.mirror: Optional[Mirror] = None

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> "NetworkManagerBus":
        _no_glib()
        from dbus_next import BusType
        from dbus_next.aio import MessageBus

        try:
            self.bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), timeout)
        except asyncio.TimeoutError:
            raise nmfacts.bus_silent(timeout) from None
        except Exception as exc:  # dbus-next raises OSError, ValueError, AuthError or plain Exception
            raise nmfacts.unreachable(exc) from exc
        return self

    def disconnect(self) -> None:
        if self.bus is not None:
            try:
                self.bus.disconnect()
            except Exception as exc:  # a bus already gone may fail to close: it is closed
                log.debug("closing the bus connection: %s", exc)
            self.bus = None

    @property
    def connected(self) -> bool:
        return self.bus is not None and self.bus.connected

    async def wait_for_disconnect(self) -> None:
        """Return when the bus connection ends (the bus died, or we closed it)."""
        try:
            await self.bus.wait_for_disconnect()
        except Exception as exc:  # an unexpected end is still an end
            log.debug("the bus connection ended: %r", exc)

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: Optional[List[Any]] = None, destination: str = NM,
                   timeout: float = CALL_TIMEOUT, serial: int = 0) -> List[Any]:
        from dbus_next import Message, MessageType

        if not self.connected:
            raise NetworkManagerError(f"cannot call {member} on {path}: the connection to the D-Bus system bus "
                                      "is closed (the bus went away); it is re-opened when the bus is back")
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=body or [], serial=serial)
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except asyncio.TimeoutError:
            getattr(self.bus, "_method_return_handlers", {}).pop(msg.serial, None)  # drop a late reply
            raise nmfacts.no_answer(destination, member, path, timeout) from None
        except Exception as exc:  # the connection broke while waiting (dbus-next raises plain errors)
            raise NetworkManagerError(f"the D-Bus system bus connection broke during {member} on {path} "
                                      f"({str(exc) or type(exc).__name__})") from exc
        if reply is None:  # dbus-next answers pending calls with nothing when the bus closes
            raise NetworkManagerError(f"the D-Bus system bus went away during {member} on {path}")
        if reply.message_type == MessageType.ERROR:
            raise nmfacts.error_reply(member, path, reply.error_name or "",
                                      reply.body[0] if reply.body else reply.error_name)
        return reply.body

    async def props(self, path: str, interface: str) -> Dict[str, Any]:
        """The properties of ``interface`` at ``path`` (those the mirror keeps, when it holds them)."""
        kept = self.mirror.answer(path, interface) if self.mirror is not None else None
        if kept is not None:
            if isinstance(kept, NetworkManagerError):
                raise kept
            return kept
        body = await self.call(path, PROPS, "GetAll", "s", [interface])
        return _plain(body[0])

    async def device_of(self, iface: str) -> str:
        """The device path of the interface ``iface`` (NetworkManagerError if none)."""
        kept = self.mirror.device_of(iface) if self.mirror is not None else None
        return kept or (await self.call(NM_PATH, NM, "GetDeviceByIpIface", "s", [iface]))[0]

    async def name_owner(self, name: str = NM) -> Optional[str]:
        try:
            body = await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner", "s",
                                   [name], destination="org.freedesktop.DBus")
        except NetworkManagerError:
            return None
        return body[0]

    async def ping(self, timeout: float = CALL_TIMEOUT) -> None:
        """A round trip to the bus itself; NetworkManagerError if it does not answer in time."""
        await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus.Peer", "Ping",
                        destination="org.freedesktop.DBus", timeout=timeout)

    async def add_match(self, rule: str) -> None:
        await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule],
                        destination="org.freedesktop.DBus")

    def on_message(self, handler: Callable[[Any], None]) -> None:
        self.bus.add_message_handler(handler)

    async def remember(self) -> None:
        """Keep NetworkManager's objects as its signals describe them (nmmirror.py; loaded by
        refresh()), and each profile's user data until NetworkManager signals that it changed
        (Settings.Connection ``Updated``/``Removed``) or restarts, so an event needs no
        round trip. The user data is kept from a reply of NetworkManager: sound because one
        sender's messages arrive in order, the signals it sent before answering a call are
        handled (synchronously, by dbus-next's reader) before the caller resumes with the
        answer, so what is kept reflects every edit it had made by then; an answer to
        GetSettings that started before an edit was signalled is used once, not kept."""
        self._profiles = {}
        self.mirror = Mirror(_plain)
        self.on_message(self.mirror.on_message)  # first: the daemon's own handler sees it current
        self.on_message(self._on_edit)
        await self.add_match(f"type='signal',sender='{NM}',interface='{SETTINGS_CONN}'")
        await self.add_match("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                             f"arg0='{NM}'")

    def _on_edit(self, msg: Any) -> None:
        if msg.interface == SETTINGS_CONN and msg.member in ("Updated", "Removed"):
            self.forget(msg.path)
        elif msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == NM:
            self.forget()  # its object paths mean other things now
            if self.mirror is not None:
                self.mirror.clear()

    async def refresh(self) -> None:
        """Load the mirror anew from one ``GetManagedObjects`` (needs a subscription to every
        signal of NetworkManager first). If it fails, everything is asked over the bus until the
        next refresh."""
        if self.mirror is None or not self.connected:
            return
        serial = self.bus.next_serial()
        self.mirror.expect(serial)
        try:
            await self.call(ROOT, OBJECT_MANAGER, "GetManagedObjects", serial=serial)
        except NetworkManagerError as exc:
            log.warning("cannot read NetworkManager's objects at once (%s); asking for each as needed", exc)

    def forget(self, settings_path: Optional[str] = None) -> None:
        """Drop what is remembered of one profile (None: of all, and the devices' hints)."""
        self._edits += 1
        if self._profiles is not None:
            if settings_path is None:
                self._profiles.clear()
                self._configs.clear()
            else:
                self._profiles.pop(settings_path, None)

    # ---- connections ---------------------------------------------------

    async def starting_up(self) -> bool:
        """True while NetworkManager is still starting (its active connections are not all known)."""
        return bool((await self.props(NM_PATH, NM)).get("Startup", False))

    async def active_paths(self) -> List[str]:
        return list((await self.props(NM_PATH, NM)).get("ActiveConnections", []))

    async def settings(self, path: str) -> Dict[str, Dict[str, Any]]:
        body = await self.call(path, SETTINGS_CONN, "GetSettings")
        return _plain(body[0])

    async def user_data(self, settings_path: str) -> Dict[str, str]:
        """The profile's user data; remembered (remember()) only if asked after a reply of
        NetworkManager for the same event (nmfacts.facts asks after the active connection's)."""
        return nmfacts.user_data(await self._settings_answer(settings_path))

    async def _settings_answer(self, settings_path: str) -> Dict[str, Any]:
        """GetSettings' answer, or what is remembered of it (the user data alone)."""
        kept = self._profiles
        if kept is not None and settings_path in kept:
            return {"user": {"data": dict(kept[settings_path])}}
        edits = self._edits
        settings = await self.settings(settings_path)
        if kept is not None and edits == self._edits:  # no edit signalled meanwhile
            kept[settings_path] = nmfacts.user_data(settings)
        return settings

    async def drive(self, steps: nmfacts.Steps) -> Any:
        """Answer the requests of nmfacts' steps; the requests of one step go out together
        (each round trip waits for two other processes)."""
        answers: Optional[List[nmfacts.Answer]] = None
        while True:
            try:
                requests = steps.send(answers)
            except StopIteration as done:
                return done.value
            answers = list(await asyncio.gather(*(self._answer(request) for request in requests)))

    async def _answer(self, request: nmfacts.Request) -> nmfacts.Answer:
        kept = self.mirror.answer(*request) if self.mirror is not None else None
        if kept is not None:
            return kept
        try:
            if request[1] == SETTINGS_CONN:
                return await self._settings_answer(request[0])
            return _plain((await self.call(*nmfacts.call_of(request)))[0])
        except NetworkManagerError as exc:
            return exc

    async def facts(self, active_path: str, device_config: bool = False, device_hint: Optional[str] = None,
                    device_props: Optional[Dict[str, Any]] = None) -> Optional[Tuple[Connection, int]]:
        """The planner's view of one active connection, with its state (nmfacts.facts).
        ``device_props``: the properties of the device ``device_hint``, if the caller read them.
        With remember(), the IP configurations the device last had are read in the same round
        trip as the connection, and their answers used only if the connection (or its device)
        names them."""
        hints = self._configs if self._profiles is not None else None
        devices = {device_hint: device_props} if device_hint and device_props is not None else None
        return await self.drive(nmfacts.facts(active_path, device_config, device_hint,
                                              devices=devices, hints=hints))

    async def active_connections(self) -> List[Connection]:
        """Every active connection NetworkManager manages (nmfacts.active_connections)."""
        return await self.drive(nmfacts.active_connections())

    async def active_state(self, uuid: str) -> Optional[int]:
        return (await self.drive(nmfacts.active_state(uuid)))[0]

    async def profiles(self) -> List[Tuple[str, Dict[str, Dict[str, Any]]]]:
        """Every connection profile: (object path, settings)."""
        body = await self.call(SETTINGS_PATH, NM + ".Settings", "ListConnections")
        return [(path, await self.settings(path)) for path in body[0]]

    async def find_profile(self, ref: str) -> Tuple[str, Dict[str, Dict[str, Any]]]:
        """A profile by UUID, id or interface name (as nmcli accepts them)."""
        by_id, by_iface = [], []
        for path, settings in await self.profiles():
            conn = settings.get("connection", {})
            if conn.get("uuid") == ref:
                return path, settings
            if conn.get("id") == ref:
                by_id.append((path, settings))
            if conn.get("interface-name") == ref:
                by_iface.append((path, settings))
        if not by_id and not by_iface:
            for path in await self.active_paths():
                found = await self.facts(path)
                if found and found[0].iface == ref:
                    return await self.find_profile(found[0].uuid)
        matches = by_id or by_iface
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NetworkManagerError(f"no connection profile {ref!r} (give an id, UUID or interface name; "
                                      "'nmcli connection' lists them)")
        raise NetworkManagerError(f"{ref!r} names {len(matches)} profiles; give its UUID")

    async def set_user_data(self, path: str, data: Mapping[str, str]) -> None:
        """Replace the profile's user data, keeping every other setting and its secrets.

        Update2 replaces the whole profile, so the current settings (with the
        secrets NetworkManager holds for them) are sent back with only ``user`` changed.
        """
        from dbus_next import Variant

        settings = (await self.call(path, SETTINGS_CONN, "GetSettings"))[0]
        for name in list(settings):
            try:
                secrets = (await self.call(path, SETTINGS_CONN, "GetSecrets", "s", [name]))[0]
            except NetworkManagerError:
                continue
            for key, value in secrets.get(name, {}).items():
                settings[name][key] = value
        if data:
            settings["user"] = {"data": Variant("a{ss}", dict(data))}
        else:
            settings.pop("user", None)
        await self.call(path, SETTINGS_CONN, "Update2", "a{sa{sv}}ua{sv}",
                        [settings, UPDATE2_TO_DISK | UPDATE2_NO_REAPPLY, {}])
