"""NetworkManager's objects as its own signals describe them: the daemon answers an event's
requests (nmfacts.py) from here, with no round trip to NetworkManager.

Loaded from one ``GetManagedObjects`` (NetworkManager's ObjectManager at ``/org/freedesktop``,
1.42 and 1.52 alike) and kept current by the signals that follow it: ``InterfacesAdded``
(a new object with all its properties), ``InterfacesRemoved``, and ``PropertiesChanged``
(the new values). Only the properties the daemon reads are kept (``KEPT``), for the
interfaces it asks about; for anything else (another interface, a property NetworkManager
only invalidated, a mirror not loaded yet or whose NetworkManager went away) the caller asks
over the bus as before. An object the loaded mirror does not hold is gone: the answer is
then the error NetworkManager would give.

Why it is sound:
- One sender's messages reach us in order and are handled here synchronously, in that order
  (dbus-next calls its message handlers as it reads). The snapshot is installed where its
  reply sits among the signals: a signal handled before it is older (the snapshot replaces
  it), one after it is newer (applied on top).
- A dispatcher event: NetworkManager emits the signals of a change before it calls its
  dispatcher, the bus passes them on in that order, and the dispatcher then starts the hook,
  which connects to the daemon. When the daemon reads the hook's request its event loop has
  already read the bus socket that was ready before (it reads every ready socket before it
  resumes the task waiting for the request).
- What the mirror cannot know stays checked as before: the addresses planned must be on the
  interface in the kernel (targeted.py), every later signal is acted on, and each full
  re-sync loads the mirror anew.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Set, Tuple

from ..errors import NetworkManagerError
from .nmfacts import ACTIVE, DEVICE, IP4CONFIG, IP6CONFIG, NM, PROPS, Answer

ROOT = "/org/freedesktop"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"

#: interface -> the properties kept: what nmfacts.py, targeted.py and the daemon read
KEPT: Dict[str, frozenset] = {
    NM: frozenset({"ActiveConnections", "Devices", "Startup"}),
    ACTIVE: frozenset({"Uuid", "Id", "State", "StateFlags", "Type", "Vpn", "Devices", "Ip4Config", "Ip6Config",
                       "Connection"}),
    DEVICE: frozenset({"Interface", "IpInterface", "ActiveConnection", "Ip4Config", "Ip6Config"}),
    IP4CONFIG: frozenset({"AddressData", "Gateway"}),
    IP6CONFIG: frozenset({"AddressData", "Gateway"}),
}

Key = Tuple[str, str]  # (object path, interface)


def _shared(value: Any) -> Any:
    """One string per object path: each is named by several objects (and keys them)."""
    if isinstance(value, str):
        return sys.intern(value) if value.startswith("/") else value
    if isinstance(value, list):
        return [_shared(item) for item in value]
    return value


class Mirror:
    """``on_message`` sees every message of the daemon's bus connection, in order."""

    def __init__(self, plain: Callable[[Any], Any]) -> None:
        self._plain = plain  # D-Bus variants -> plain values
        self._objects: Dict[Key, Dict[str, Any]] = {}
        #: kept properties NetworkManager invalidated without a value: asked over the bus
        self._unsure: Set[Key] = set()
        #: NetworkManager's unique bus name the loaded mirror follows; None: not loaded
        self.owner: Optional[str] = None
        self._asked: Optional[int] = None  # serial of the GetManagedObjects whose reply loads it

    @property
    def live(self) -> bool:
        return self.owner is not None

    def expect(self, serial: int) -> None:
        """The reply to the call with this serial is the snapshot to load."""
        self._asked = serial

    def clear(self) -> None:
        """NetworkManager went away (or the snapshot failed): everything is asked over the bus."""
        self._objects.clear()
        self._unsure.clear()
        self.owner = None

    # ---- intake ------------------------------------------------------------

    def on_message(self, msg: Any) -> None:
        if msg.reply_serial:  # a reply (or an error) to one of our calls
            if msg.reply_serial == self._asked:
                self._asked = None
                if msg.error_name or not msg.body:
                    self.clear()
                else:
                    self._load(msg.sender, msg.body[0])
            return
        if self.owner is None or msg.sender != self.owner:
            return
        member = msg.member
        if member == "PropertiesChanged" and msg.interface == PROPS and len(msg.body) == 3:
            self._changed(msg.path, *msg.body)
        elif member == "InterfacesAdded" and msg.interface == OBJECT_MANAGER and msg.path == ROOT:
            self._added(*msg.body)
        elif member == "InterfacesRemoved" and msg.interface == OBJECT_MANAGER and msg.path == ROOT:
            path, interfaces = msg.body
            for interface in interfaces:
                self._objects.pop((path, interface), None)
                self._unsure.discard((path, interface))

    def _load(self, owner: str, managed: Dict[str, Dict[str, Dict[str, Any]]]) -> None:
        self.clear()
        for path, interfaces in managed.items():
            self._added(path, interfaces)
        self.owner = owner

    def _added(self, path: str, interfaces: Dict[str, Dict[str, Any]]) -> None:
        for interface, props in interfaces.items():
            kept = KEPT.get(interface)
            if kept is not None:
                key = (sys.intern(path), interface)
                self._objects[key] = {n: _shared(self._plain(v)) for n, v in props.items() if n in kept}
                self._unsure.discard(key)

    def _changed(self, path: str, interface: str, changed: Dict[str, Any], invalidated: Any) -> None:
        kept = KEPT.get(interface)
        if kept is None:
            return
        key = (path, interface)
        props = self._objects.get(key)
        if props is None:  # a change to an object never added: not what NetworkManager does; ask it
            self._unsure.add(key)
            return
        for name, value in changed.items():
            if name in kept:
                props[name] = _shared(self._plain(value))
        if any(name in kept for name in invalidated):
            self._unsure.add(key)

    # ---- answers -------------------------------------------------------------

    def answer(self, path: str, interface: str) -> Optional[Answer]:
        """``GetAll``'s answer (the kept properties), the error for an object that is gone, or
        None: ask NetworkManager."""
        key = (path, interface)
        if self.owner is None or interface not in KEPT or key in self._unsure:
            return None
        props = self._objects.get(key)
        if props is None:
            return NetworkManagerError(f"NetworkManager has no {interface} object at {path} (it went away)")
        return dict(props)

    def device_of(self, iface: str) -> Optional[str]:
        """The device whose IP interface (else interface) is ``iface`` (as ``GetDeviceByIpIface``);
        None: ask NetworkManager. A scan: the caller remembers the answer."""
        if self.owner is None:
            return None
        named = None
        for (path, interface), props in self._objects.items():
            if interface == DEVICE and (path, interface) not in self._unsure:
                if props.get("IpInterface") == iface:
                    return path
                if named is None and props.get("Interface") == iface:
                    named = path
        return named

    def __len__(self) -> int:
        return len(self._objects)
