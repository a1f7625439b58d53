"""The dispatcher door: one NetworkManager event (interface, action, environment) -> reconcile.

Facts come from the environment first (IP variables on ``up``/``dhcp*-change``,
``CONNECTION_USER_*`` from NM 1.46) and from NetworkManager over D-Bus for what it
lacks (user data on NM < 1.46, addresses on ``pre-up``). A ``down`` for a connection
that NetworkManager reports active again (a stale, queued event) removes nothing.
Never raises: the hook must never block NetworkManager.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Dict, List, Mapping, Optional, Tuple

from .errors import NetworkManagerError
from .model import Address, Connection

log = logging.getLogger(__name__)

ENSURE = {"pre-up", "up", "dhcp4-change", "dhcp6-change", "reapply", "vpn-pre-up", "vpn-up"}
REMOVE = {"pre-down", "down", "vpn-pre-down", "vpn-down"}
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
    prefix = "VPN_IP%d_" % family if env.get("VPN_IP_IFACE") else "IP%d_" % family
    addresses, gateway = [], env.get(prefix + "GATEWAY") or None
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
        if len(words) > 1 and words[1] not in ("0.0.0.0", "::") and not gateway:
            gateway = words[1]
    return addresses, gateway


def facts_from_env(iface: str, env: Mapping[str, str], user: Optional[Dict[str, str]]) -> Optional[Connection]:
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


async def _from_bus(uuid: str, with_facts: bool) -> Tuple[Optional[int], Optional[Connection]]:
    """(state, facts) of the connection as NetworkManager sees it now; facts only if asked
    (a removal needs only the state)."""
    from .adapters.networkmanager import ACTIVE, NetworkManagerBus

    nm = await NetworkManagerBus().connect()
    try:
        for path in await nm.active_paths():
            try:
                props = await nm.props(path, ACTIVE)
            except NetworkManagerError:
                continue  # it went away meanwhile
            if props.get("Uuid") != uuid:
                continue
            found = await nm.facts(path, device_config=True) if with_facts else None
            return int(props.get("State", 0)), found[0] if found else None
        return None, None
    finally:
        nm.disconnect()


def handle(iface: str, action: str, env: Mapping[str, str], engine) -> str:
    """Process one event; returns a one-line outcome (for the log)."""
    uuid = env.get("CONNECTION_UUID", "")
    if action not in ENSURE | REMOVE:
        return f"{action}: nothing to do"
    if not uuid:
        return f"{action} on {iface}: no CONNECTION_UUID, nothing to do"
    if env.get("CONNECTION_EXTERNAL") == "1":
        return f"{action} on {iface}: external connection, not ours to manage"
    from .adapters.networkmanager import ACTIVATED, ACTIVATING

    try:
        state, bus_facts = asyncio.run(_from_bus(uuid, with_facts=action in ENSURE))
        bus_ok = True
    except NetworkManagerError as exc:
        log.warning("NetworkManager is not reachable over D-Bus (%s); using the event's environment", exc)
        state, bus_facts, bus_ok = None, None, False
    if action in REMOVE:
        if bus_ok and state in (ACTIVATING, ACTIVATED) and action in ("down", "vpn-down"):
            return f"{action} for {uuid}: stale (NetworkManager reports it active again), kept"
        engine.remove(uuid)
        return f"{action}: removed the policy of {uuid}"
    if bus_ok and state not in (ACTIVATING, ACTIVATED):
        return f"{action} for {uuid}: stale (no longer active), ignored"
    user = user_data_from_env(env) or (dict(bus_facts.user_data) if bus_facts else None)
    if user is None and not bus_ok:
        log.error("%s for %s: cannot read its policy (no CONNECTION_USER_* variables and no D-Bus); "
                  "left as it was. Start dbus/NetworkManager, then run 'nm-policy-routing apply'.",
                  action, uuid)
        return f"{action} for {uuid}: policy unknown, left as it was"
    env_facts = facts_from_env(iface, env, user)
    conn = bus_facts if bus_facts and bus_facts.addresses else env_facts or bus_facts
    if conn is None:
        return f"{action} for {uuid}: no facts, nothing to do"
    result = engine.ensure(conn)
    cp = result.plan_of(uuid)
    for error in cp.errors if cp else ():
        log.error("%s", error)
    return f"{action} for {conn.label} on {conn.iface}: {cp.status if cp else '?'}"
