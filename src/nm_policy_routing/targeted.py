"""The daemon's per-connection path: one event names one connection -> read that connection's
facts from NetworkManager -> ensure or remove its policy alone.

Used for events the dispatcher hook hands over (handoff.py). Nothing of the event is
believed but the action and which connection it names: the connection is found by
UUID among NetworkManager's active connections (through the device of the named
interface first: O(1); a full scan only when that fails, e.g. a VPN, whose device is
its parent's). A ``down`` for a connection NetworkManager reports active again (a
stale, queued event) removes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Dict, Optional, Tuple

from .adapters.networkmanager import ACTIVATED, ACTIVATING, ACTIVE, DEVICE, NM, NM_PATH, PROPS, NetworkManagerBus
from .errors import NetworkManagerError, PolicyRoutingError
from .handoff import ENSURE, Request
from .model import Connection

log = logging.getLogger(__name__)


class Targeted:
    """Acts on one connection at a time with the daemon's bus connection and engine."""

    def __init__(self, nm: NetworkManagerBus, engine, executor: Optional[Executor] = None) -> None:
        self.nm = nm
        self.engine = engine
        self.executor = executor
        #: UUID -> the active connection's object path last seen (a hint, always re-checked)
        self._paths: Dict[str, str] = {}

    async def _device_active(self, iface: str) -> Optional[str]:
        try:
            device = (await self.nm.call(NM_PATH, NM, "GetDeviceByIpIface", "s", [iface]))[0]
            value = (await self.nm.call(device, PROPS, "Get", "ss", [DEVICE, "ActiveConnection"]))[0]
        except NetworkManagerError:
            return None  # no such device (a VPN's tunnel may have none)
        path = getattr(value, "value", value)
        return path if path and path != "/" else None

    async def _facts(self, path: str, uuid: str) -> Optional[Tuple[Connection, int]]:
        found = await self.nm.facts(path)
        if found and found[0].uuid == uuid:
            self._paths[uuid] = path
            return found
        return None

    async def find(self, request: Request, scan: bool) -> Optional[Tuple[Connection, int]]:
        """(facts, state) of the active connection ``request`` names; None if it is not active."""
        tried = set()
        for path in (await self._device_active(request.iface), self._paths.get(request.uuid)):
            if path and path not in tried:
                tried.add(path)
                found = await self._facts(path, request.uuid)
                if found:
                    return found
        if not scan:
            return None
        for path in await self.nm.active_paths():
            if path in tried:
                continue
            try:
                props = await self.nm.props(path, ACTIVE)
            except NetworkManagerError:
                continue  # it went away meanwhile
            if props.get("Uuid") == request.uuid:
                return await self._facts(path, request.uuid)
        return None

    async def _engine(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def handle(self, request: Request) -> Tuple[str, str]:
        """Act on one event; (verdict, text) for the hook: ok, error or fallback."""
        try:
            found = await self.find(request, scan=request.action in ENSURE)
        except NetworkManagerError as exc:
            log.warning("%s: NetworkManager is not reachable (%s); the hook acts itself", request, exc)
            return "fallback", f"NetworkManager is not reachable: {exc}"
        try:
            if request.action in ENSURE:
                return await self._ensure(request, found)
            return await self._remove(request, found)
        except PolicyRoutingError as exc:
            log.error("%s: %s", request, exc)
            return "error", str(exc)

    async def _ensure(self, request: Request, found: Optional[Tuple[Connection, int]]) -> Tuple[str, str]:
        if found is None or found[1] not in (ACTIVATING, ACTIVATED):
            return "ok", f"{request}: stale (the connection is no longer active), ignored"
        conn = found[0]
        if conn.type == "external":
            return "ok", f"{request}: external connection, not ours to manage"
        result = await self._engine(self.engine.ensure, conn)
        for change in result.changes:
            log.info("%s: %s", conn.label, change)
        cp = result.plan_of(conn.uuid)
        errors = list(cp.errors) if cp else []
        for error in errors:
            log.error("%s", error)
        status = cp.status if cp else "?"
        text = f"{request.action} for {conn.label} on {conn.iface}: {status}"
        return ("error", f"{text}: {errors[0]}") if status in ("error", "conflict", "invalid") and errors \
            else ("ok", text)

    async def _remove(self, request: Request, found: Optional[Tuple[Connection, int]]) -> Tuple[str, str]:
        if found is not None and found[1] in (ACTIVATING, ACTIVATED) and request.action in ("down", "vpn-down"):
            return "ok", f"{request}: stale (NetworkManager reports it active again), kept"
        result = await self._engine(self.engine.remove, request.uuid)
        for change in result.changes:
            log.info("%s: %s", request.uuid, change)
        self._paths.pop(request.uuid, None)
        return "ok", f"{request.action}: removed the policy of {request.uuid}"
