"""The dispatcher door: one NetworkManager event (interface, action, environment) -> reconcile.

Facts come from the environment first (IP variables on ``up``/``dhcp*-change``,
``CONNECTION_USER_*`` from NM 1.46) and from NetworkManager over D-Bus for what it
lacks (user data on NM < 1.46, addresses on ``pre-up``). For a VPN (``vpn-*`` events)
the interface is the event's ``VPN_IP_IFACE`` (tun0), its addresses and gateway the
``VPN_IP*_`` ones; a gateway ``0.0.0.0``/``::`` means none. A ``down`` for a connection
that NetworkManager reports active again (a stale, queued event) removes nothing; a
``pre-down`` asks NetworkManager nothing (it is never stale), unless the record is damaged
and every active connection is re-applied.
An address still tentative (duplicate address detection) is left out and a detached,
bounded wait (settle.py) re-applies when it is ready.
NetworkManager is asked over the synchronous client (adapters/syncbus.py) with the
decisions the daemon's async client uses (adapters/nmfacts.py): the hook imports no asyncio,
and the engine (with its data model) only once the event needs it: a stale event does not.
Never raises: the hook must never block NetworkManager.
"""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Tuple

from .errors import NetworkManagerError

if TYPE_CHECKING:
    from .model import Address, Connection
    from .reconcile import Engine

log = logging.getLogger(__name__)

ENSURE = {"pre-up", "up", "dhcp4-change", "dhcp6-change", "reapply", "vpn-pre-up", "vpn-up"}
REMOVE = {"pre-down", "down", "vpn-pre-down", "vpn-down"}
#: the connection is still up and going down now: nothing NetworkManager says changes what to do
PRE_DOWN = {"pre-down", "vpn-pre-down"}
_OCTAL = re.compile(r"_([0-7]{3})")


def decode_user_key(env_name: str) -> Optional[str]:
    """``CONNECTION_USER_A__B_055_C`` -> ``a.b-C`` (NetworkManager 1.46's encoding)."""
    if not env_name.startswith("CONNECTION_USER_"):
        return None
    text, out, i = env_name[len("CONNECTION_USER_"):], [], 0
    while i < len(text):
        if text.startswith("__", i):
            out.append(".")
            i += 2
        elif text[i] == "_" and _OCTAL.match(text, i):
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        elif text[i] == "_" and i + 1 < len(text) and text[i + 1].isupper():
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i].lower())
            i += 1
    return "".join(out)


def user_data_from_env(env: Mapping[str, str]) -> Optional[Dict[str, str]]:
    data = {}
    for name, value in env.items():
        key = decode_user_key(name)
        if key is not None:
            data[key] = value
    return data or None


def _ip_from_env(env: Mapping[str, str], family: int) -> Tuple[List[Address], Optional[str]]:
    from .model import Address

    prefix = "VPN_IP%d_" % family if env.get("VPN_IP_IFACE") else "IP%d_" % family
    addresses, gateway = [], _gateway(env.get(prefix + "GATEWAY"), family)
    try:
        count = int(env.get(prefix + "NUM_ADDRESSES", "0") or "0")
    except ValueError:
        count = 0
    for n in range(count):
        text = env.get(f"{prefix}ADDRESS_{n}", "")
        if not text:
            continue
        words = text.split()
        try:
            addresses.append(Address.parse(words[0]))
        except ValueError:
            log.warning("ignoring unreadable %sADDRESS_%d=%r", prefix, n, text)
            continue
        if len(words) > 1 and not gateway:
            gateway = _gateway(words[1], family)
    return addresses, gateway


def _gateway(text: Optional[str], family: int) -> Optional[str]:
    """The event's gateway, or None: ``0.0.0.0``/``::`` (even ``VPN_IP6_GATEWAY=0.0.0.0``) mean none."""
    from .model import real_gateway

    gateway = real_gateway(text)
    return gateway if gateway and (":" in gateway) == (family == 6) else None


def facts_from_env(iface: str, env: Mapping[str, str], user: Optional[Dict[str, str]]) -> Optional[Connection]:
    from .model import Connection

    uuid = env.get("CONNECTION_UUID", "")
    if not uuid:
        return None
    addr4, gw4 = _ip_from_env(env, 4)
    addr6, gw6 = _ip_from_env(env, 6)
    return Connection(
        uuid=uuid, id=env.get("CONNECTION_ID", uuid),
        iface=env.get("VPN_IP_IFACE") or env.get("DEVICE_IP_IFACE") or iface,
        addresses=tuple(addr4 + addr6), gateway4=gw4, gateway6=gw6,
        user_data=tuple(sorted((user or {}).items())),
        type=env.get("CONNECTION_TYPE", ""),
    )


def _from_bus(uuid: str, with_facts: bool) -> Tuple[Optional[int], Optional[Connection]]:
    """(state, facts) of the connection as NetworkManager sees it now; facts only if asked
    (a removal needs only the state)."""
    from .adapters import nmfacts, syncbus

    return syncbus.drive(nmfacts.active_state(uuid, with_facts, device_config=True))


def _all_active() -> List[Connection]:
    from .adapters import nmfacts, syncbus

    return syncbus.drive(nmfacts.active_connections())


def _rebuild(action: str, uuid: str, engine: Engine, own: Optional[Connection] = None) -> Optional[str]:
    """A damaged record knows no other connection: one event would remove their policies as
    stale. Re-apply every active connection instead (None: record fine or NetworkManager silent).
    ``own``: the event's facts for its connection (on ``pre-up`` its active connection shows no
    addresses over D-Bus yet: the list alone would plan it empty)."""
    from .record import Record

    if not Record.load(engine.directory).damaged:
        return None
    try:
        conns = _all_active()
    except NetworkManagerError as exc:
        log.warning("cannot list the active connections to rebuild the record (%s)", exc)
        return None
    if action in REMOVE or own is not None:
        conns = [c for c in conns if c.uuid != uuid] + ([own] if own is not None else [])
    result = engine.reconcile(conns)
    _tell(result)
    if result.waiting and not getattr(engine, "dry_run", False):
        from .settle import start

        for waiting in result.waiting:
            start(engine.directory, waiting)
    return f"{action} for {uuid}: the record was damaged; rebuilt from {len(conns)} active connections"


def _tell(result) -> None:
    from .story import tell

    tell(result)


def handle(iface: str, action: str, env: Mapping[str, str], make_engine: Callable[[], Engine]) -> str:
    """Process one event; returns a one-line outcome (for the log). ``make_engine`` is called
    once the event needs the engine."""
    uuid = env.get("CONNECTION_UUID", "")
    if action not in ENSURE | REMOVE:
        return f"{action}: nothing to do"
    if not uuid:
        return f"{action} on {iface}: no CONNECTION_UUID, nothing to do"
    if env.get("CONNECTION_EXTERNAL") == "1":
        return f"{action} on {iface}: external connection, not ours to manage"
    from .adapters.nmfacts import ACTIVATED, ACTIVATING
    from .journal import about, named

    event = SimpleNamespace(uuid=uuid, id=env.get("CONNECTION_ID", uuid), iface=env.get("DEVICE_IP_IFACE") or iface)
    state, bus_facts, bus_ok = None, None, True
    if action not in PRE_DOWN:  # a pre-down is never stale: it asks NetworkManager nothing (but a rebuild)
        try:
            state, bus_facts = _from_bus(uuid, with_facts=action in ENSURE)
        except NetworkManagerError as exc:
            log.warning("%s: %s: NetworkManager is not reachable over D-Bus (%s); using the event's environment",
                        named(event), action, exc, extra=about(event))
            bus_ok = False
    if action in REMOVE:
        if bus_ok and state in (ACTIVATING, ACTIVATED) and action in ("down", "vpn-down"):
            return f"{action} for {uuid}: stale (NetworkManager reports it active again), kept"
        engine = make_engine()
        rebuilt = _rebuild(action, uuid, engine) if bus_ok else None
        if rebuilt:
            return rebuilt
        _tell(engine.remove(uuid))
        return f"{action}: removed the policy of {uuid}"
    if bus_ok and state not in (ACTIVATING, ACTIVATED):
        return f"{action} for {uuid}: stale (no longer active), ignored"
    engine = make_engine()
    user = user_data_from_env(env) or (dict(bus_facts.user_data) if bus_facts else None)
    if user is None and not bus_ok:
        log.error("%s: %s: cannot read its policy (no CONNECTION_USER_* variables and no D-Bus); "
                  "left as it was. Start dbus/NetworkManager, then run 'nm-policy-routing apply'.",
                  named(event), action, extra=about(event))
        return f"{action} for {uuid}: policy unknown, left as it was"
    env_facts = facts_from_env(iface, env, user)
    conn = bus_facts if bus_facts and bus_facts.addresses else env_facts or bus_facts
    if conn is not None and env.get("VPN_IP_IFACE") and conn.iface != env["VPN_IP_IFACE"]:
        # a VPN's own interface (tun0) is the event's word; D-Bus names it only when
        # NetworkManager has a device for it (see NetworkManagerBus.facts)
        from .model import replace

        conn = replace(conn, iface=env["VPN_IP_IFACE"])
    rebuilt = _rebuild(action, uuid, engine, own=conn) if bus_ok else None
    if rebuilt:
        return rebuilt
    if conn is None:
        return f"{action} for {uuid}: no facts, nothing to do"
    result = engine.ensure(conn)
    _tell(result)
    cp = result.plan_of(uuid)
    if result.waiting.get(uuid) and not getattr(engine, "dry_run", False):
        from .settle import start

        start(engine.directory, uuid)  # nothing else calls us when DAD is done: a detached wait does
        return (f"{action} for {conn.label} on {conn.iface}: {cp.status if cp else '?'}, waiting for "
                f"{', '.join(result.waiting[uuid])} (duplicate address detection)")
    return f"{action} for {conn.label} on {conn.iface}: {cp.status if cp else '?'}"
