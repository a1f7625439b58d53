"""The daemon's per-connection path: one event names one connection -> read that connection's
facts from NetworkManager -> ensure or remove its policy alone.

Used for events the dispatcher hook hands over (handoff.py) and for NetworkManager's
signals that name one connection (its state, its device's or its IP configuration's
properties). Nothing of an event is believed but which connection it names: the
connection is found by UUID among NetworkManager's active connections (through the
device of the named interface first: O(1); a full scan only when that fails, e.g. a
VPN, whose device is its parent's). A ``down`` for a connection NetworkManager reports
active again (a stale, queued event) removes nothing. A connection is ensured once
ACTIVATED (or on the hook's ``pre-up``), never while its addresses may be incomplete, nor
by a signal once its ``pre-down`` came. What an event decides is stamped with when it
began reading NetworkManager: a full re-sync whose snapshot is older keeps it (daemon.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from typing import Callable, Dict, List, Optional, Tuple

from .adapters.networkmanager import (ACTIVATED, ACTIVATING, ACTIVE, DEACTIVATED, DEACTIVATING, DEVICE, NM,
                                      PROPS, NetworkManagerBus)
from .errors import NetworkManagerError, PolicyRoutingError
from .handoff import ENSURE, Request
from .model import Address, Connection, replace
from .journal import about, named
from .scoped import Scoped
from .story import tell

log = logging.getLogger(__name__)


class Targeted:
    """Acts on one connection at a time with the daemon's bus connection and engine."""

    def __init__(self, nm: NetworkManagerBus, engine, executor: Optional[Executor] = None) -> None:
        self.nm = nm
        self.engine = engine
        self.executor = executor
        #: UUID -> the active connection's object path last seen (a hint, always re-checked)
        self._paths: Dict[str, str] = {}
        #: interface -> its device's object path
        self._devices: Dict[str, str] = {}
        #: active connection path -> (UUID, interface), for signals about a connection that is gone
        self._seen: Dict[str, Tuple[str, str]] = {}
        #: IP4Config/IP6Config path -> the active connection path it belongs to
        self._configs: Dict[str, str] = {}
        #: active connections whose pre-down removed the policy: NetworkManager is taking them down,
        #: a signal that still shows them activated must not install it again
        self._leaving: Dict[str, None] = {}
        #: active connection paths with a signal not yet acted on (bursts collapse)
        self._pending: Dict[str, None] = {}
        self._busy = False
        #: UUID -> when the event last acted on it started reading NetworkManager (monotonic), set by
        #: the engine job: a full re-sync whose snapshot is older keeps what that event did
        self.decided: Dict[str, float] = {}
        self._rtnl = None  # for the address check, in the loop's thread
        self.scoped = Scoped(engine)
        #: called in the loop after each engine job of an event (the daemon re-arms its cgroup watch)
        self.after_job: Callable[[], None] = lambda: None

    async def _device_active(self, iface: str) -> Tuple[Optional[str], Optional[str], Dict]:
        """(the active connection on the device of ``iface``, the device's path, its properties);
        the device's path is remembered."""
        for attempt in (0, 1):
            device = self._devices.get(iface)
            try:
                if device is None:
                    device = self._devices[iface] = await self.nm.device_of(iface)
                props = await self.nm.props(device, DEVICE)
                break
            except NetworkManagerError:
                self._devices.pop(iface, None)  # gone, or another device now: ask again once
                if attempt:
                    return None, None, {}  # no such device (a VPN's tunnel may have none)
        path = props.get("ActiveConnection")
        return (path if path and path != "/" else None), device, props

    async def _facts(self, path: str, uuid: Optional[str], device: Optional[str] = None,
                     device_props: Optional[Dict] = None) -> Optional[Tuple[Connection, int]]:
        found = await self.nm.facts(path, device_config=True, device_hint=device, device_props=device_props)
        if found and (uuid is None or found[0].uuid == uuid):
            self._paths[found[0].uuid] = path
            self._seen[path] = (found[0].uuid, found[0].iface)
            return found
        return None

    async def find(self, request: Request, scan: bool) -> Optional[Tuple[Connection, int]]:
        """(facts, state) of the active connection ``request`` names; None if it is not active.

        The usual case takes no round trip to NetworkManager: its objects are mirrored from
        its signals (nmmirror.py) and the profile's user data is remembered between edits
        (NetworkManagerBus.remember). The path: the active connection this UUID last had
        (learnt from its signals or an earlier event), else the device of the interface and
        its active connection. Without the mirror (not loaded, or NetworkManager restarting)
        each step is one round trip: the connection, its device and the IP configurations the
        device last had are asked together."""
        tried = set()
        known = self._paths.get(request.uuid)
        if known:
            tried.add(known)
            found = await self._facts(known, request.uuid, self._devices.get(request.iface))
            if found and found[1] in (ACTIVATING, ACTIVATED):  # else it may be active again elsewhere
                return found
        on_device, device, props = await self._device_active(request.iface)
        for path in (on_device, self._paths.get(request.uuid)):
            if path and path not in tried:
                tried.add(path)
                found = await self._facts(path, request.uuid, *((device, props) if path == on_device else ()))
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

    def _kernel(self):
        if self._rtnl is None:
            from .adapters.rtnl import Rtnl

            self._rtnl = Rtnl()
        return self._rtnl

    def from_kernel(self, conn: Connection) -> Connection:
        """When NetworkManager shows no IP configuration over D-Bus yet (pre-up; 1.52 also on a
        first up), the kernel holds what it configured: the interface's addresses and its main-table default routes."""
        rtnl = self._kernel()
        addresses = tuple(Address.parse(f"{ip}/{length}") for ip, length in rtnl.prefixes(conn.iface))
        if not addresses:
            return conn
        gateways = rtnl.gateways(conn.iface)
        log.debug("%s: no IP configuration from NetworkManager over D-Bus yet; using what the kernel holds on %s",
                  named(conn), conn.iface, extra=about(conn))
        return replace(conn, addresses=addresses, gateway4=gateways.get(4), gateway6=gateways.get(6))

    def missing_addresses(self, conn: Connection) -> List[str]:
        """The connection's addresses the kernel does not hold on its interface (yet)."""
        if not conn.addresses:
            return []
        held = self._kernel().addresses(conn.iface)
        return [f"{a.ip}/{a.prefixlen}" for a in conn.addresses if a.ip not in held]

    def _ensure_one(self, conn: Connection, since: float):
        """In the engine thread: the one-connection reconcile, else the full one."""
        try:
            return self.scoped.ensure(conn) or self.engine.ensure(conn)
        finally:
            self._decided(conn.uuid, since)

    def _remove_one(self, uuid: str, since: float):
        try:
            return self.scoped.remove(uuid) or self.engine.remove(uuid)
        finally:
            self._decided(uuid, since)

    def _decided(self, uuid: str, since: float) -> None:
        if len(self.decided) > 1024:  # only the recent ones matter (a re-sync's snapshot takes seconds)
            self.decided = {u: t for u, t in self.decided.items() if t > since - 60}
        self.decided[uuid] = max(since, self.decided.get(uuid, since))

    async def _engine(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.after_job()

    async def active(self, request: Request) -> bool:
        """Does NetworkManager report the connection ``request`` names active (activating or
        activated) — for a queued ``down``, which must then keep its policy. One round trip:
        the active connection it last had and the device of its interface, asked together."""
        async def names_it(path: Optional[str]) -> bool:
            try:
                props = await self.nm.props(path, ACTIVE) if path else {}
            except NetworkManagerError:
                return False  # gone
            return props.get("Uuid") == request.uuid and int(props.get("State", 0)) in (ACTIVATING, ACTIVATED)

        known = self._paths.get(request.uuid)
        was_known, (on_device, _, _) = await asyncio.gather(names_it(known), self._device_active(request.iface))
        if was_known:
            return True
        if on_device and on_device != known and await names_it(on_device):
            self._paths[request.uuid] = on_device  # (the next event's hint)
            return True
        return False

    async def handle(self, request: Request) -> Tuple[str, str]:
        """Act on one event; (verdict, text) for the hook: ok, error or fallback. A ``pre-down``
        removes without asking NetworkManager (it says nothing a ``pre-down`` depends on)."""
        since = time.monotonic()
        try:
            if request.action in ENSURE:
                found = await self.find(request, scan=True)
            else:
                again = request.action in ("down", "vpn-down") and await self.active(request)
        except NetworkManagerError as exc:
            log.warning("%s: NetworkManager is not reachable (%s); the hook acts itself", request, exc)
            return "fallback", f"NetworkManager is not reachable: {exc}"
        try:
            if request.action in ENSURE:
                return await self._ensure(request, found, since)
            return await self._remove(request, again, since)
        except PolicyRoutingError as exc:
            log.error("%s: %s", request, exc)
            return "error", str(exc)

    async def _ensure(self, request: Request, found: Optional[Tuple[Connection, int]], since: float,
                      signalled: Optional[str] = None) -> Tuple[str, str]:
        """``since``: when reading the facts started. ``signalled``: the active connection's path,
        for a signal about it (not acted on if its pre-down or a newer signal about it came
        meanwhile: checked where nothing can come between the check and the engine)."""
        if found is None or found[1] not in (ACTIVATING, ACTIVATED):
            return "ok", f"{request}: stale (the connection is no longer active), ignored"
        conn = found[0]
        if conn.type == "external":
            return "ok", f"{request}: external connection, not ours to manage"
        if not conn.addresses and conn.iface:
            # no IP configuration over D-Bus yet (pre-up; on 1.52 also a first 'up'): the kernel
            # holds what NetworkManager configured. Never plan an active connection empty: that
            # would remove its policy (and its flows) until the next event brings the addresses.
            conn = self.from_kernel(conn)
            if not conn.addresses:
                return "ok", f"{request.action} for {conn.label} on {conn.iface}: no address in the kernel yet"
        missing = self.missing_addresses(conn)
        if missing:  # act on complete facts: plan with what the kernel holds; a later event brings the rest
            held = tuple(a for a in conn.addresses if f"{a.ip}/{a.prefixlen}" not in missing)
            log.info("%s for %s on %s: the interface does not hold %s yet; planning without it until "
                     "NetworkManager's next event for it", request.action, conn.label, conn.iface, ", ".join(missing))
            if not held:
                return "ok", f"{request.action} for {conn.label} on {conn.iface}: no address in the kernel yet"
            conn = replace(conn, addresses=held)
        if signalled in self._leaving:
            return "ok", f"{request}: its pre-down came meanwhile, nothing installed"
        if signalled in self._pending:  # (e.g. its deactivation): that signal's facts are newer
            return "ok", f"{request}: a newer signal about it came meanwhile; acting on that one"
        if signalled is None:  # the hook's event, checked with NetworkManager just now: it is active
            self._leaving.pop(self._paths.get(conn.uuid), None)
        result = await self._engine(self._ensure_one, conn, since)
        cp = result.plan_of(conn.uuid)
        gone = self.missing_addresses(conn) if cp is not None and cp.status == "error" else []
        if gone:
            # the kernel refused because the interface lost addresses meanwhile (NetworkManager
            # taking the connection down, or changing its addresses): not the policy's fault;
            # NetworkManager's next event for it says what to do
            log.debug("%s for %s on %s: %s went away while its policy was applied (%s); waiting for "
                      "NetworkManager's next event", request.action, conn.label, conn.iface, ", ".join(gone),
                      "; ".join(cp.errors), extra=about(conn))
            return "ok", (f"{request.action} for {conn.label} on {conn.iface}: its addresses went away "
                          "meanwhile; nothing installed until NetworkManager's next event")
        tell(result, why=request.action)
        errors = list(cp.errors) if cp else []
        status = cp.status if cp else "?"
        text = f"{request.action} for {conn.label} on {conn.iface}: {status}"
        return ("error", f"{text}: {errors[0]}") if status in ("error", "conflict", "invalid") and errors \
            else ("ok", text)

    async def _remove(self, request: Request, active_again: bool, since: float) -> Tuple[str, str]:
        if active_again:
            return "ok", f"{request}: stale (NetworkManager reports it active again), kept"
        # a pre-down keeps the path as the UUID's hint: NetworkManager still shows the connection
        # (deactivating) until its signals say it went; a later event checks the path's UUID and state
        pre_down = request.action.endswith("pre-down")
        leaving = self._paths.get(request.uuid) if pre_down else self._paths.pop(request.uuid, None)
        if leaving and pre_down:
            if len(self._leaving) > 1024:  # (each is dropped when it goes; stay bounded if not)
                self._leaving.clear()
            self._leaving[leaving] = None
        result = await self._engine(self._remove_one, request.uuid, since)
        tell(result, why=request.action)
        return "ok", f"{request.action}: removed the policy of {request.uuid}"

    # ---- NetworkManager's signals ------------------------------------------

    def takes(self, msg) -> Optional[bool]:
        """True: a signal about one connection, acted on here; None: nothing to do (another signal
        of the same change does it); False: not one connection's (the caller re-syncs all)."""
        if msg.interface == ACTIVE and msg.member == "StateChanged":
            return self._queue(msg.path)
        if msg.interface != PROPS or msg.member != "PropertiesChanged" or not msg.body:
            return False
        target, changed = msg.body[0], set(msg.body[1]) if len(msg.body) > 1 else set()
        if target == ACTIVE:
            return self._queue(msg.path)
        if target in (NM + ".IP4Config", NM + ".IP6Config"):
            # an unknown one is new: its connection is still activating, and acted on once ACTIVATED
            owner = self._configs.get(msg.path)
            return self._queue(owner) if owner else None
        if target == DEVICE:
            return self._queue("device:" + msg.path)
        if target == NM and changed <= {"ActiveConnections", "PrimaryConnection", "State", "Connectivity"}:
            return None  # each connection's own StateChanged tells what changed
        return False

    def _queue(self, path: str) -> bool:
        self._pending[path] = None
        if not self._busy:
            self._busy = True
            asyncio.ensure_future(self._drain())
        return True

    async def _drain(self) -> None:
        try:
            while self._pending:
                path = next(iter(self._pending))
                del self._pending[path]
                try:
                    await self._on_signal(path)
                except PolicyRoutingError as exc:
                    log.error("acting on NetworkManager's signal about %s: %s", path, exc)
                except Exception:  # the per-event fence: log, keep serving
                    log.exception("unexpected error acting on NetworkManager's signal about %s", path)
        finally:
            self._busy = False

    async def _on_signal(self, path: str) -> None:
        since = time.monotonic()
        if path.startswith("device:"):
            try:
                path = (await self.nm.props(path[7:], DEVICE)).get("ActiveConnection")
            except NetworkManagerError:
                return  # the device went away: its connection's own signal says so
            if not path or path == "/":
                return
        try:
            found = await self._facts(path, None)
        except NetworkManagerError:
            found = None
        if found is None:  # the active connection is gone: remove its policy unless it is active again
            self._drop_configs(path)
            self._leaving.pop(path, None)
            if path in self._seen:
                uuid, iface = self._seen.pop(path)
                request = Request("down", iface or "lo", uuid)
                await self._remove(request, await self.active(request), since)
            return
        conn, state = found
        if path in self._leaving:
            if state in (ACTIVATING, ACTIVATED):
                return  # after its pre-down (a signal of before, or of the teardown): nothing to install
            self._leaving.pop(path, None)
        await self._learn_configs(path)
        request = Request("up" if state in (ACTIVATING, ACTIVATED) else "down", conn.iface or "lo", conn.uuid)
        if state == ACTIVATED:
            text = (await self._ensure(request, found, since, signalled=path))[1]
            log.debug("%s", text)
        elif state in (DEACTIVATING, DEACTIVATED):
            self._seen.pop(path, None)
            self._drop_configs(path)
            await self._remove(request, False, since)

    def _drop_configs(self, path: str) -> None:
        for config in [c for c, owner in self._configs.items() if owner == path]:
            del self._configs[config]

    def forget(self) -> None:
        """NetworkManager restarted: its object paths mean other things now."""
        self._paths.clear()
        self._devices.clear()
        self._seen.clear()
        self._leaving.clear()
        self._configs.clear()

    async def _learn_configs(self, path: str) -> None:
        """Which IP configurations belong to this active connection (their signals name only them)."""
        try:
            props = await self.nm.props(path, ACTIVE)
        except NetworkManagerError:
            return
        self._drop_configs(path)
        for key in ("Ip4Config", "Ip6Config"):
            config = props.get(key)
            if config and config != "/":
                self._configs[config] = path

    async def learn_all(self) -> None:
        """After a full resync: learn every active connection's IP configurations."""
        try:
            paths = await self.nm.active_paths()
        except NetworkManagerError:
            return
        for path in paths:
            await self._learn_configs(path)
