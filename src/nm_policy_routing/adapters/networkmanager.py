"""NetworkManager over D-Bus (dbus-next): connection facts, user data, signals.

The only module that imports the D-Bus library (dbus-next; dbus-fast is a drop-in
successor). Honours ``DBUS_SYSTEM_BUS_ADDRESS``. Everything is keyed by connection
UUID: object paths change when NetworkManager restarts. Every call has a timeout: a
hung bus or NetworkManager yields a NetworkManagerError, never a process that waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..errors import NetworkManagerError, NotPermittedError
from ..model import Address, Connection, real_gateway

log = logging.getLogger(__name__)

NM = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
SETTINGS_PATH = "/org/freedesktop/NetworkManager/Settings"
ACTIVE = NM + ".Connection.Active"
DEVICE = NM + ".Device"
SETTINGS_CONN = NM + ".Settings.Connection"
PROPS = "org.freedesktop.DBus.Properties"

#: Connection.Active states
ACTIVATING, ACTIVATED, DEACTIVATING, DEACTIVATED = 1, 2, 3, 4
#: Connection.Active StateFlags: NetworkManager only assumed it (docker bridges, lo...)
ACTIVATION_EXTERNAL = 0x80
UPDATE2_TO_DISK = 0x1
UPDATE2_NO_REAPPLY = 0x40
#: seconds to wait for the bus to accept us, and for any one reply
CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0


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


def _config(active: Dict[str, Any], device: Dict[str, Any], key: str) -> str:
    """The active connection's Ip4Config/Ip6Config path, else its device's."""
    path = active.get(key) or "/"
    return path if path != "/" else device.get(key) or "/"


def _hints(device: Dict[str, Any]) -> Tuple[str, ...]:
    """A device's IP configurations' paths (those it has)."""
    return tuple(p for p in (device.get("Ip4Config"), device.get("Ip6Config")) if p and p != "/")


async def _nothing() -> Dict[str, str]:
    return {}


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

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> "NetworkManagerBus":
        _no_glib()
        from dbus_next import BusType
        from dbus_next.aio import MessageBus

        try:
            self.bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), timeout)
        except asyncio.TimeoutError:
            raise NetworkManagerError(
                f"the D-Bus system bus accepted the connection but did not answer within {timeout:g} s; "
                "is dbus-daemon hung? (DBUS_SYSTEM_BUS_ADDRESS selects another bus)") from None
        except Exception as exc:  # dbus-next raises OSError, ValueError, AuthError or plain Exception
            raise NetworkManagerError(
                f"cannot reach the D-Bus system bus ({exc}); is dbus running? "
                "(DBUS_SYSTEM_BUS_ADDRESS selects another bus)") from exc
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
                   timeout: float = CALL_TIMEOUT) -> List[Any]:
        from dbus_next import Message, MessageType

        if not self.connected:
            raise NetworkManagerError(f"cannot call {member} on {path}: the connection to the D-Bus system bus "
                                      "is closed (the bus went away); it is re-opened when the bus is back")
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=body or [])
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except asyncio.TimeoutError:
            getattr(self.bus, "_method_return_handlers", {}).pop(msg.serial, None)  # drop a late reply
            who = "dbus-daemon" if destination == "org.freedesktop.DBus" else "NetworkManager (or dbus-daemon)"
            raise NetworkManagerError(
                f"{destination} did not answer {member} on {path} within {timeout:g} s; is {who} hung?") from None
        except Exception as exc:  # the connection broke while waiting (dbus-next raises plain errors)
            raise NetworkManagerError(f"the D-Bus system bus connection broke during {member} on {path} "
                                      f"({str(exc) or type(exc).__name__})") from exc
        if reply is None:  # dbus-next answers pending calls with nothing when the bus closes
            raise NetworkManagerError(f"the D-Bus system bus went away during {member} on {path}")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            if "PermissionDenied" in (reply.error_name or "") or "AccessDenied" in (reply.error_name or ""):
                raise NotPermittedError(f"NetworkManager refused {member} on {path}: {text}")
            raise NetworkManagerError(f"NetworkManager {member} on {path} failed: {reply.error_name}: {text}")
        return reply.body

    async def props(self, path: str, interface: str) -> Dict[str, Any]:
        body = await self.call(path, PROPS, "GetAll", "s", [interface])
        return _plain(body[0])

    async def name_owner(self) -> Optional[str]:
        try:
            body = await self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner", "s",
                                   [NM], destination="org.freedesktop.DBus")
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
        """Keep each profile's user data until NetworkManager signals that it changed
        (Settings.Connection ``Updated``/``Removed``) or restarts, so an event needs no
        GetSettings round trip. Sound because one sender's messages arrive in order: the
        signals NetworkManager sent before answering a call are handled (synchronously, by
        dbus-next's reader) before the caller resumes with the answer, so what is kept after
        a reply of NetworkManager reflects every edit it had made by then; an answer to
        GetSettings that started before an edit was signalled is used once, not kept."""
        self._profiles = {}
        self.on_message(self._on_edit)
        await self.add_match(f"type='signal',sender='{NM}',interface='{SETTINGS_CONN}'")
        await self.add_match("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                             f"arg0='{NM}'")

    def _on_edit(self, msg: Any) -> None:
        if msg.interface == SETTINGS_CONN and msg.member in ("Updated", "Removed"):
            self.forget(msg.path)
        elif msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == NM:
            self.forget()  # its object paths mean other things now

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
        NetworkManager for the same event (facts() asks after the active connection's)."""
        kept = self._profiles
        if kept is not None and settings_path in kept:
            return dict(kept[settings_path])
        edits = self._edits
        settings = await self.settings(settings_path)
        data = dict(settings.get("user", {}).get("data", {}))
        if kept is not None and edits == self._edits:  # no edit signalled meanwhile
            kept[settings_path] = dict(data)
        return data

    async def _ip_props(self, path: str) -> Optional[Dict[str, Any]]:
        try:
            return await self.props(path, NM + (".IP6Config" if "IP6Config" in path else ".IP4Config"))
        except NetworkManagerError:
            return None

    async def _ip(self, path: str, read: Mapping[str, Optional[Dict[str, Any]]]
                  ) -> Tuple[List[Address], Optional[str]]:
        if not path or path == "/":
            return [], None
        props = read[path] if path in read else await self._ip_props(path)
        if props is None:
            return [], None
        addrs = [Address.parse(f"{a['address']}/{a['prefix']}") for a in props.get("AddressData", [])]
        return addrs, real_gateway(props.get("Gateway"))

    async def _vpn_interface(self, ip4: str, ip6: str) -> str:
        """A VPN's IP interface (tun0), which its ``Devices`` do not give: they list the parent.

        NetworkManager (1.42 and 1.52 alike) exports for a VPN the IP configuration object of
        the VPN's IP interface (``nm_l3cfg_ipconfig_acquire`` on the tunnel's l3cfg, or the
        parent's for a VPN without its own interface): the same object path as that device's
        ``Ip4Config``/``Ip6Config``. "" when no device shares it (the event's VPN_IP_IFACE
        then names it)."""
        wanted = {p for p in (ip4, ip6) if p and p != "/"}
        if not wanted:
            return ""
        for device in (await self.props(NM_PATH, NM)).get("Devices", []):
            try:
                dev = await self.props(device, DEVICE)
            except NetworkManagerError:
                continue  # it went away meanwhile
            if {dev.get("Ip4Config"), dev.get("Ip6Config")} & wanted:
                return dev.get("IpInterface") or dev.get("Interface") or ""
        return ""

    async def facts(self, active_path: str, device_config: bool = False, device_hint: Optional[str] = None,
                    device_props: Optional[Dict[str, Any]] = None) -> Optional[Tuple[Connection, int]]:
        """The planner's view of one active connection, with its state; None if it vanished.

        ``device_config``: while the connection shows no IP configuration yet (on ``pre-up``),
        take its device's (for one event about this connection, whose addresses the caller
        checks are in the kernel). ``device_hint``: its device's path, if the caller knows it
        (read at the same time as the connection, unless the caller read it: ``device_props``).
        With remember(), the IP configurations the device last had are read in the same round
        trip, and their answers used only if the connection (or its device) names them."""
        hints = _hints(device_props) if device_props is not None else self._configs.get(device_hint or "", ())
        try:  # independent calls go out together: each round trip waits for two other processes
            calls = [self.props(active_path, ACTIVE)]
            if device_hint and device_props is None:
                calls.append(self.props(device_hint, DEVICE))
            replies = await asyncio.gather(*calls, *(self._ip_props(p) for p in hints))
        except NetworkManagerError:
            return None
        active = replies[0]
        hinted = device_props if device_props is not None else replies[1] if device_hint else {}
        read = dict(zip(hints, replies[len(calls):]))
        if active.get("Vpn"):  # its Devices list its parent: never borrow the parent's configuration
            iface, dev = await self._vpn_interface(active.get("Ip4Config", "/"), active.get("Ip6Config", "/")), {}
        else:
            iface, dev = "", {}
            for device in active.get("Devices", []):
                dev = hinted if device == device_hint else await self.props(device, DEVICE)
                iface = dev.get("IpInterface") or dev.get("Interface") or ""
                if iface:
                    break
        # on pre-up the active connection shows no IP configuration yet ("/"), its device does
        # (and the kernel holds it)
        borrow = dev if device_config else {}
        config4, config6 = _config(active, borrow, "Ip4Config"), _config(active, borrow, "Ip6Config")
        if self._profiles is not None and device_hint and dev is hinted:
            if len(self._configs) > 1024:  # devices come and go (each with a new path): stay bounded
                self._configs.clear()
            self._configs[device_hint] = tuple(p for p in (config4, config6) if p != "/")
        (addr4, gw4), (addr6, gw6), user = await asyncio.gather(
            self._ip(config4, read), self._ip(config6, read),
            self.user_data(active["Connection"]) if active.get("Connection") else _nothing())
        conn = Connection(
            uuid=active.get("Uuid", ""), id=active.get("Id", ""), iface=iface,
            addresses=tuple(addr4 + addr6), gateway4=gw4, gateway6=gw6,
            user_data=tuple(sorted(user.items())),
            type="external" if int(active.get("StateFlags", 0)) & ACTIVATION_EXTERNAL else active.get("Type", ""),
        )
        return conn, int(active.get("State", 0))

    async def active_connections(self) -> List[Connection]:
        """Every active connection (activating with addresses, or activated), external ones left out:
        NetworkManager does not manage them (lo, docker bridges), so neither do we."""
        out = []
        for path in await self.active_paths():
            found = await self.facts(path)
            if found and found[1] in (ACTIVATING, ACTIVATED) and found[0].uuid and found[0].type != "external":
                out.append(found[0])
        return out

    async def active_state(self, uuid: str) -> Optional[int]:
        for path in await self.active_paths():
            try:
                props = await self.props(path, ACTIVE)
            except NetworkManagerError:
                continue
            if props.get("Uuid") == uuid:
                return int(props.get("State", 0))
        return None

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
