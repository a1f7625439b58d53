"""What NetworkManager's D-Bus objects say about its active connections, decided without I/O.

The decisions (which objects to ask, in which order, and what their properties mean) are
generators, "steps": each ``yield`` hands out a list of requests and is sent back the
answers in the same order. A request is ``(path, interface)``: the properties of
``interface`` at ``path`` as plain values (``GetAll``), or with ``SETTINGS_CONN`` a
profile's settings (``GetSettings``). An answer is that dict, or the NetworkManagerError
its call ended with (the steps decide whether it matters). The requests of one yield are
independent: a driver may send them together. Two drivers answer them: the async client
(``NetworkManagerBus.drive``: the daemon, the CLI) and the synchronous wire client
(``syncbus.drive``: the standalone dispatcher hook, which must not import asyncio), so
both read the same facts. Also here: NetworkManager's names and the text of its failures.
The data model is imported when facts are read: the hook's stale events only ask for a state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Generator, List, Optional, Tuple, Union

from ..errors import NetworkManagerError, NotPermittedError

if TYPE_CHECKING:
    from ..model import Address, Connection

NM = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
SETTINGS_PATH = "/org/freedesktop/NetworkManager/Settings"
ACTIVE = NM + ".Connection.Active"
DEVICE = NM + ".Device"
SETTINGS_CONN = NM + ".Settings.Connection"
IP4CONFIG, IP6CONFIG = NM + ".IP4Config", NM + ".IP6Config"
PROPS = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"

#: Connection.Active states
ACTIVATING, ACTIVATED, DEACTIVATING, DEACTIVATED = 1, 2, 3, 4
#: Connection.Active StateFlags: NetworkManager only assumed it (docker bridges, lo...)
ACTIVATION_EXTERNAL = 0x80
#: seconds to wait for the bus to accept us, and for any one reply
CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0

Request = Tuple[str, str]
Answer = Union[Dict[str, Any], NetworkManagerError]
Steps = Generator[List[Request], List[Answer], Any]


# ---- one request as a D-Bus call, and what its failures say -----------------------


def call_of(request: Request) -> Tuple[str, str, str, str, List[Any]]:
    """``(path, interface, member, signature, body)`` of the method call answering ``request``;
    the reply's first value is the answer."""
    path, interface = request
    if interface == SETTINGS_CONN:
        return path, SETTINGS_CONN, "GetSettings", "", []
    return path, PROPS, "GetAll", "s", [interface]


def unreachable(exc: BaseException) -> NetworkManagerError:
    return NetworkManagerError(f"cannot reach the D-Bus system bus ({exc}); is dbus running? "
                               "(DBUS_SYSTEM_BUS_ADDRESS selects another bus)")


def bus_silent(timeout: float) -> NetworkManagerError:
    return NetworkManagerError(
        f"the D-Bus system bus accepted the connection but did not answer within {timeout:g} s; "
        "is dbus-daemon hung? (DBUS_SYSTEM_BUS_ADDRESS selects another bus)")


def no_answer(destination: str, member: str, path: str, timeout: float) -> NetworkManagerError:
    who = "dbus-daemon" if destination == DBUS else "NetworkManager (or dbus-daemon)"
    return NetworkManagerError(
        f"{destination} did not answer {member} on {path} within {timeout:g} s; is {who} hung?")


def error_reply(member: str, path: str, error_name: str, text: str) -> Exception:
    """The exception for an error reply: NotPermittedError when NetworkManager refused us."""
    if "PermissionDenied" in error_name or "AccessDenied" in error_name:
        return NotPermittedError(f"NetworkManager refused {member} on {path}: {text}")
    return NetworkManagerError(f"NetworkManager {member} on {path} failed: {error_name}: {text}")


# ---- the steps ---------------------------------------------------------------------


def _value(answer: Answer) -> Dict[str, Any]:
    if isinstance(answer, NetworkManagerError):
        raise answer
    return answer


def _config(active: Dict[str, Any], device: Dict[str, Any], key: str) -> str:
    """The active connection's Ip4Config/Ip6Config path, else its device's."""
    path = active.get(key) or "/"
    return path if path != "/" else device.get(key) or "/"


def _ip(answer: Optional[Answer]) -> Tuple[List[Address], Optional[str]]:
    """Addresses and gateway of an IP configuration (none if there is none, or it vanished)."""
    from ..model import Address, real_gateway

    if answer is None or isinstance(answer, NetworkManagerError):
        return [], None
    addrs = [Address.parse(f"{a['address']}/{a['prefix']}") for a in answer.get("AddressData", [])]
    return addrs, real_gateway(answer.get("Gateway"))


def _iface(device: Dict[str, Any]) -> str:
    return device.get("IpInterface") or device.get("Interface") or ""


def vpn_interface(ip4: str, ip6: str, devices: Optional[Dict[str, Answer]] = None) -> Steps:
    """A VPN's IP interface (tun0), which its ``Devices`` do not give: they list the parent.

    NetworkManager (1.42 and 1.52 alike) exports for a VPN the IP configuration object of
    the VPN's IP interface (``nm_l3cfg_ipconfig_acquire`` on the tunnel's l3cfg, or the
    parent's for a VPN without its own interface): the same object path as that device's
    ``Ip4Config``/``Ip6Config``. "" when no device shares it (the event's VPN_IP_IFACE
    then names it). ``devices``: every device's properties, if the caller has read them."""
    wanted = {p for p in (ip4, ip6) if p and p != "/"}
    if not wanted:
        return ""
    if devices is None:
        (manager,) = yield [(NM_PATH, NM)]
        paths = _value(manager).get("Devices", [])
    for device in devices if devices is not None else paths:
        (answer,) = [devices[device]] if devices is not None else (yield [(device, DEVICE)])
        if isinstance(answer, NetworkManagerError):
            continue  # it went away meanwhile
        if {answer.get("Ip4Config"), answer.get("Ip6Config")} & wanted:
            return _iface(answer)
    return ""


def _config_request(path: str) -> Request:
    return path, IP6CONFIG if "IP6Config" in path else IP4CONFIG


def facts(active_path: str, device_config: bool = False, device_hint: Optional[str] = None,
          active: Optional[Dict[str, Any]] = None, devices: Optional[Dict[str, Answer]] = None,
          hints: Optional[Dict[str, Tuple[str, ...]]] = None) -> Steps:
    """The planner's view of one active connection, with its state; None if it vanished.

    ``device_config``: while the connection shows no IP configuration yet (on ``pre-up``),
    take its device's (for one event about this connection, whose addresses the caller
    checks are in the kernel). ``device_hint``: its device's path, if the caller knows it
    (read at the same time as the connection). ``active``: its properties, and ``devices``:
    every device's (or the hinted one's), if the caller has just read them. ``hints``
    (device path -> the IP configuration paths it last had, kept by the caller and updated
    here): those are read in the first round trip too, and their answers used only if the
    connection (or its device) names them now."""
    known = devices is not None and device_hint is not None and device_hint in devices
    prefetch: Tuple[str, ...] = ()
    if hints is not None and device_hint:
        if known:
            shown = devices[device_hint]
            prefetch = () if isinstance(shown, NetworkManagerError) else tuple(
                p for p in (shown.get("Ip4Config"), shown.get("Ip6Config")) if p and p != "/")
        else:
            prefetch = hints.get(device_hint, ())
    asks = (([] if active is not None else [(active_path, ACTIVE)])
            + ([(device_hint, DEVICE)] if device_hint and not known else [])
            + [_config_request(p) for p in prefetch])
    answers = list((yield asks)) if asks else []
    try:
        if active is None:
            active = _value(answers.pop(0))
        hinted = {}
        if device_hint:
            hinted = _value(devices[device_hint] if known else answers.pop(0))
    except NetworkManagerError:
        return None
    read = dict(zip(prefetch, answers))
    if active.get("Vpn"):  # its Devices list its parent: never borrow the parent's configuration
        iface = yield from vpn_interface(active.get("Ip4Config", "/"), active.get("Ip6Config", "/"), devices)
        dev = {}
    else:
        iface, dev = "", {}
        for device in active.get("Devices", []):
            if device == device_hint:
                dev = hinted
            elif devices is not None and device in devices:
                dev = _value(devices[device])
            else:
                (answer,) = yield [(device, DEVICE)]
                dev = _value(answer)
            iface = _iface(dev)
            if iface:
                break
    # on pre-up the active connection shows no IP configuration yet ("/"), its device does
    # (and the kernel holds it)
    borrow = dev if device_config else {}
    config4, config6 = _config(active, borrow, "Ip4Config"), _config(active, borrow, "Ip6Config")
    if hints is not None and device_hint and dev is hinted:
        if len(hints) > 1024:  # devices come and go (each with a new path): stay bounded
            hints.clear()
        hints[device_hint] = tuple(p for p in (config4, config6) if p != "/")
    asks = [_config_request(p) for p in (config4, config6) if p != "/" and p not in read]
    if active.get("Connection"):
        asks.append((active["Connection"], SETTINGS_CONN))
    got = dict(zip((path for path, _ in asks), (yield asks))) if asks else {}
    got.update(read)
    from ..model import Connection

    (addr4, gw4), (addr6, gw6) = _ip(got.get(config4)), _ip(got.get(config6))
    settings = got.get(active.get("Connection") or "")
    user = user_data(settings) if settings is not None else {}
    conn = Connection(
        uuid=active.get("Uuid", ""), id=active.get("Id", ""), iface=iface,
        addresses=tuple(addr4 + addr6), gateway4=gw4, gateway6=gw6,
        user_data=tuple(sorted(user.items())),
        type="external" if int(active.get("StateFlags", 0)) & ACTIVATION_EXTERNAL else active.get("Type", ""),
    )
    return conn, int(active.get("State", 0))


def user_data(settings: Answer) -> Dict[str, str]:
    """A profile's ``user`` data from its settings (a failed GetSettings raises)."""
    return dict(_value(settings).get("user", {}).get("data", {}))


def _actives(devices: bool = False) -> Steps:
    """(path, properties or the error reading them) of every active connection, asked together;
    with ``devices``, also {path: properties or error} of every device, in the same step."""
    (manager,) = yield [(NM_PATH, NM)]
    paths = list(_value(manager).get("ActiveConnections", []))
    devs = list(_value(manager).get("Devices", [])) if devices and paths else []
    answers = (yield [(path, ACTIVE) for path in paths] + [(dev, DEVICE) for dev in devs]) if paths else []
    return list(zip(paths, answers)), dict(zip(devs, answers[len(paths):]))


def active_connections() -> Steps:
    """Every active connection (activating with addresses, or activated), external ones left out:
    NetworkManager does not manage them (lo, docker bridges), so neither do we."""
    out = []
    actives, _ = yield from _actives()
    for path, answer in actives:
        if isinstance(answer, NetworkManagerError):
            continue  # it went away meanwhile
        found = yield from facts(path, active=answer)
        if found and found[1] in (ACTIVATING, ACTIVATED) and found[0].uuid and found[0].type != "external":
            out.append(found[0])
    return out


def active_state(uuid: str, with_facts: bool = False, device_config: bool = False) -> Steps:
    """``(state, facts)`` of the active connection ``uuid`` ((None, None) if it is not active);
    facts only if asked (a removal needs only the state). For one connection's facts every
    device is read with the connections: three round trips, whichever device (or VPN) it is."""
    actives, devices = yield from _actives(devices=with_facts)
    for path, answer in actives:
        if isinstance(answer, NetworkManagerError) or answer.get("Uuid") != uuid:
            continue  # it went away meanwhile, or another
        found = ((yield from facts(path, device_config=device_config, active=answer, devices=devices))
                 if with_facts else None)
        return int(answer.get("State", 0)), found[0] if found else None
    return None, None
