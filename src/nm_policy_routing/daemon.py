"""The D-Bus listener: follow NetworkManager and keep every active connection's policy right.

Subscribe first, then snapshot and reconcile. A signal about one connection (its
state, its device's or IP configuration's properties) is acted on for that connection
alone (targeted.py); any other relevant signal (a profile edited or removed,
NetworkManager restarting) schedules one coalesced resync: snapshot all active
connections and reconcile. Netlink events (a link coming back, one of our routes or rules deleted)
schedule the same. Signals are accepted only from the current owner of
NetworkManager's bus name. While it follows NetworkManager, the daemon holds
``daemon.lock`` in the state directory (daemonlock.py) and serves ``handoff.sock``
there: the dispatcher hook hands each event over and waits for the verified result
(handoff.py, targeted.py), so on ``pre-up`` the policy is in the kernel before
NetworkManager reports the connection activated. All engine work runs on one worker
thread, in order. systemd's ``JobRemoved`` (when systemd is on the bus) re-syncs when a
unit that a policy's ``apps`` lists, and that was waiting for its cgroup, has started;
inotify does when a listed ``cgroup:/PATH`` that did not exist appears (cgroupwatch.py).

A lost bus (dbus-daemon died or stopped answering) is noticed at once (the connection
ends) or by the heartbeat (a ping without answer): the daemon logs it, lets go of
``daemon.lock``, answers handed-over events with "act yourself" (so the hook works
meanwhile), reconnects with backoff and re-syncs. Under systemd with ``WatchdogSec=``
it sends ``WATCHDOG=1`` only while the bus answers and no re-sync is stuck, so systemd
restarts a daemon that is not really following.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional, Tuple

from . import daemonlock
from .adapters.networkmanager import ACTIVE, DEVICE, NM, PROPS, SETTINGS_CONN, NetworkManagerBus
from .adapters.resident import Resident, trim_heap
from .errors import NetworkManagerError, PolicyRoutingError
from .handoff import HandoffServer, Request
from .reconcile import Engine
from .story import tell
from .targeted import Targeted

log = logging.getLogger(__name__)

SAFETY_RESYNC_SECONDS = 60
#: how often the bus is pinged without a systemd watchdog (with one: twice per WatchdogSec)
HEARTBEAT_SECONDS = 15.0
#: reconnect delays after a bus loss: doubling from the first to the last
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
#: systemd's manager on the system bus: its JobRemoved says when a unit listed in apps started
SYSTEMD, SYSTEMD_PATH = "org.freedesktop.systemd1", "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = SYSTEMD + ".Manager"
_IP_KEYS = {"Ip4Config", "Ip6Config", "State", "IpInterface", "ActiveConnections", "AddressData", "Gateway",
            "Startup"}


def sd_notify(text: str) -> None:
    """Tell systemd (Type=notify) how we are; silent without NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(text.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def watchdog_interval() -> Optional[float]:
    """Seconds between WATCHDOG=1 pings (half of systemd's WatchdogSec), None without a watchdog."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def relevant(msg: Any) -> bool:
    """Does this NetworkManager signal change what the policies depend on?"""
    iface, member = msg.interface, msg.member
    if iface == ACTIVE and member == "StateChanged":
        return True
    if iface == SETTINGS_CONN and member in ("Updated", "Removed"):
        return True
    if iface == NM + ".Settings" and member in ("ConnectionRemoved", "NewConnection"):
        return True
    if iface == PROPS and member == "PropertiesChanged" and msg.body:
        target = msg.body[0]
        if target in (NM + ".IP4Config", NM + ".IP6Config"):
            return True
        if target in (NM, DEVICE, ACTIVE) and len(msg.body) > 1:
            return bool(_IP_KEYS & set(msg.body[1]))
    return False


class Daemon:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.nm: Optional[NetworkManagerBus] = None
        self.owner: Optional[str] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.wake: Optional[asyncio.Event] = None
        self.stopping = False
        self._lock_fd: Optional[int] = None
        #: every engine call runs here, one at a time
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.handoff: Optional[HandoffServer] = None
        self.resident = Resident()
        engine.keep_kernel(self.resident)
        self.targeted: Optional[Targeted] = None
        self._stop: Optional[asyncio.Event] = None
        #: set when the bus is found dead (by the heartbeat); the connection loop reconnects
        self._lost: Optional[asyncio.Event] = None
        #: monotonic time the running re-sync started, None when idle (the heartbeat checks it)
        self._busy_since: Optional[float] = None
        self._told: Dict[str, Tuple[str, ...]] = {}  # errors last logged per connection (story.tell)
        #: systemd's unique bus name, when its unit jobs are followed (_follow_units; "" while it
        #: re-executes itself)
        self._systemd: Optional[str] = None
        #: inotify on the cgroup directories listed in apps that do not exist yet
        self._cgroups: Optional[Any] = None

    # ---- signal intake -------------------------------------------------

    def _on_message(self, msg: Any) -> None:
        from dbus_next import MessageType

        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "JobRemoved" and msg.interface == SYSTEMD_MANAGER:
            self._unit_done(msg)
            return
        if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
            if msg.body and msg.body[0] == NM:
                self.owner = msg.body[2] or None
                log.info("NetworkManager %s", "appeared" if self.owner else "went away")
                if self.targeted is not None:
                    self.targeted.forget()
                if self.owner:
                    self.schedule("NetworkManager (re)started")
            elif msg.body and msg.body[0] == SYSTEMD and self._systemd is not None:
                # systemd re-executed itself (daemon-reexec): the same subscriber list, a new bus name
                self._systemd = msg.body[2] or ""
            return
        if not self.owner or msg.sender != self.owner:
            if relevant(msg):
                log.warning("ignored a %s.%s signal from %s, which is not NetworkManager",
                            msg.interface, msg.member, msg.sender)
            return
        if relevant(msg):
            taken = self.targeted.takes(msg) if self.targeted is not None else False
            if taken is False:
                self.schedule(f"{msg.interface}.{msg.member} on {msg.path}")

    def _unit_done(self, msg: Any) -> None:
        """systemd finished a job: a unit listed in a policy's ``apps`` that was waiting for its
        cgroup has started, so its sockets are marked now (a re-sync), not at the next periodic one."""
        if not self._systemd or msg.sender != self._systemd or len(msg.body) != 4:
            return
        _id, _job, unit, outcome = msg.body
        if outcome == "done" and f"unit:{unit}" in self.engine.waiting_apps:
            log.info("unit %s, listed in a policy's apps, started: marking its sockets", unit)
            self.schedule(f"unit {unit} started")

    def schedule(self, why: str) -> None:
        """Ask for a resync (thread-safe); bursts collapse into one."""
        log.debug("resync requested: %s", why)
        if self.loop and self.wake:
            self.loop.call_soon_threadsafe(self.wake.set)

    # ---- the work ------------------------------------------------------

    async def _resync_forever(self) -> None:
        assert self.wake is not None
        while not self.stopping:
            await self.wake.wait()
            self.wake.clear()
            if self.stopping:
                break
            await self.resync()

    async def resync(self) -> None:
        self._busy_since = time.monotonic()
        try:
            await self._resync()
        finally:
            self._busy_since = None

    async def _resync(self) -> None:
        assert self.loop is not None
        nm = self.nm
        if nm is None or not nm.connected:
            log.warning("not re-syncing: no connection to the D-Bus system bus (re-syncs when it is back)")
            return
        try:
            await nm.refresh()  # the mirror of NetworkManager's objects loaded anew: the safety net
            if await nm.starting_up():
                log.info("NetworkManager is still starting up; waiting before re-syncing")
                return
            since = time.monotonic()
            conns = await nm.active_connections()
        except PolicyRoutingError as exc:
            log.error("cannot read NetworkManager's active connections: %s", exc)
            return
        try:
            result = await self.loop.run_in_executor(self.executor, self._reconcile_all, conns, since)
        except PolicyRoutingError as exc:
            log.error("reconcile failed: %s", exc)
            return
        except Exception:  # the per-event fence: log, keep serving
            log.exception("unexpected error while reconciling; the daemon keeps running")
            return
        tell(result, self._told)
        self._arm_cgroups()
        if self.targeted is not None:
            await self.targeted.learn_all()

    def _keep_activating(self, conns):
        """A connection still activating shows no IP configuration over D-Bus while the hook's
        pre-up already applied its policy (from its device or the kernel): keep what was recorded
        for it rather than remove it; its ACTIVATED brings NetworkManager's facts."""
        known = self.engine.known()
        return [known[c.uuid] if not c.addresses and c.uuid in known and known[c.uuid].addresses
                and known[c.uuid].iface == c.iface else c for c in conns]

    def _newer_events(self, conns, since: float):
        """A connection an event (the hook's or a signal's) acted on with facts read after this
        re-sync's snapshot began: what that event recorded wins over the older snapshot (kept as
        recorded; removed if it removed it) — else a pre-up could be undone by a snapshot taken
        before the connection was active, or a pre-down by one taken before it went."""
        decided = self.targeted.decided if self.targeted is not None else {}
        newer = {uuid for uuid, when in decided.items() if when >= since}
        if not newer:
            return conns
        known = self.engine.known()
        return [c for c in conns if c.uuid not in newer] + [known[u] for u in sorted(newer) if u in known]

    def _reconcile_all(self, conns, since: float):
        """One engine job: an event's job (a pre-up) cannot come between what is kept of the
        record and the reconcile that relies on it."""
        conns = self._newer_events(self._keep_activating(conns), since)
        self.resident.forget_all()  # the safety net: everything read from the kernel again
        try:
            return self.engine.reconcile(conns)
        finally:
            trim_heap()

    async def _on_handoff(self, request: Request) -> Tuple[str, str]:
        """An event the dispatcher hook handed over: act on that connection alone, then answer."""
        if self.targeted is None or self.nm is None or not self.nm.connected:
            return "fallback", "the daemon has no connection to the D-Bus system bus right now"
        try:
            verdict, text = await self.targeted.handle(request)
        except Exception:  # the per-event fence: log, let the hook act itself
            log.exception("unexpected error on %s; the hook acts itself", request)
            return "fallback", "unexpected error in the daemon (see its log)"
        log.info("%s", text)
        return verdict, text

    # ---- cgroups listed in apps that appear later ------------------------

    def _start_cgroup_watch(self) -> None:
        from .adapters.cgroupwatch import CgroupWatch

        assert self.loop is not None
        try:
            self._cgroups = CgroupWatch()
        except OSError as exc:
            log.debug("no inotify (%s): a cgroup listed in apps that appears later waits for the next re-sync", exc)
            return
        self.loop.add_reader(self._cgroups.fd, self._cgroup_event)

    def _arm_cgroups(self) -> None:
        """Watch for the ``cgroup:/PATH`` targets the last full reconcile left waiting."""
        if self._cgroups is None:
            return
        from .adapters.cgroups import cgroup_dir

        paths = {cgroup_dir(t) for t in self.engine.waiting_apps if t.startswith("cgroup:")}
        if self._cgroups.arm(p for p in paths if p is not None):
            self.schedule("a cgroup listed in apps exists now")

    def _cgroup_event(self) -> None:
        if self._cgroups is not None and self._cgroups.appeared():
            log.info("a cgroup listed in a policy's apps appeared (%s): marking its sockets",
                     ", ".join(sorted(p for p in self._cgroups.waiting if os.path.isdir(p))))
            self.schedule("a cgroup listed in apps appeared")

    # ---- netlink watch -------------------------------------------------

    def _watch_netlink(self) -> None:
        """Links coming up, our routes or rules deleted, notifications lost: resync (runs in a thread)."""
        from .adapters.rtnlwatch import RtnlWatch

        watch = RtnlWatch(ignore_portid=self.resident.portid)
        try:
            while not self.stopping:
                try:
                    events = watch.events()
                except OSError:  # the thread's fence: log, keep watching
                    log.exception("netlink watch failed")
                    time.sleep(1)
                    continue
                if any(e.routes for e in events):
                    self.resident.forget_routes()
                if any(e.rules for e in events):
                    self.resident.forget_rules()
                if any(e.link for e in events):
                    self.resident.forget_sysctls()  # a new link of the same name starts with defaults
                for text in dict.fromkeys(e.text for e in events if e.resync or e.usable):
                    self.schedule(text)  # (a usable address: a policy may wait for it, DAD done)
        finally:
            watch.close()

    def _watch_nftables(self) -> None:
        """Our nft table deleted or changed by someone (``nft flush ruleset``): resync (a thread)."""
        from .adapters.nfnetlink import NftWatch
        from .model import NFT_TABLE

        watch = NftWatch(ignore_pid=self.resident.thread_id)
        try:
            while not self.stopping:
                try:
                    events = watch.events()
                except OSError:
                    log.exception("nftables watch failed")
                    time.sleep(1)
                    continue
                touched = [name for name, table in events if table == NFT_TABLE]
                if touched:
                    self.resident.forget_ours()
                if any(table != NFT_TABLE or name == "overrun" for name, table in events):
                    self.resident.forget_foreign()
                if touched:
                    self.schedule(f"nftables {', '.join(sorted(set(touched)))} on our table")
        finally:
            watch.close()

    async def _safety_net(self) -> None:
        """A slow periodic resync, for what sends no notification (a sysctl changed by hand)."""
        while not self.stopping:
            await asyncio.sleep(SAFETY_RESYNC_SECONDS)
            self.schedule("periodic check")  # a full re-sync: it forgets every remembered view

    # ---- liveness ------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Ping the bus; tell systemd's watchdog we are alive only while it answers and no
        re-sync is stuck. A bus that does not answer counts as lost."""
        assert self._lost is not None
        watchdog = watchdog_interval()
        interval = watchdog or HEARTBEAT_SECONDS
        while not self.stopping:
            await asyncio.sleep(interval)
            nm = self.nm
            if nm is None or not nm.connected:
                continue  # the connection loop is reconnecting: not alive, no ping
            try:
                await nm.ping(timeout=min(interval, 10.0))
            except NetworkManagerError as exc:
                log.error("the D-Bus system bus does not answer (%s); reconnecting", exc)
                self._lost.set()
                continue
            busy = self._busy_since
            if busy is not None and time.monotonic() - busy > 2 * interval:
                log.error("a re-sync has been running for %.0f s; not telling systemd we are alive",
                          time.monotonic() - busy)
                continue
            if watchdog:
                sd_notify("WATCHDOG=1")

    # ---- the bus connection --------------------------------------------

    async def _connect(self) -> None:
        """Connect, subscribe, then learn NetworkManager's owner (subscribe first, then snapshot)."""
        nm = await NetworkManagerBus().connect()
        try:
            await nm.remember()  # NetworkManager's objects and profiles' user data kept: no round trip per event
            nm.on_message(self._on_message)
            await nm.add_match(f"type='signal',sender='{NM}'")
            await nm.add_match("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                               f"arg0='{NM}'")
            self.owner = await nm.name_owner()
            await self._follow_units(nm)
        except BaseException:
            nm.disconnect()
            raise
        self.nm = nm
        if self.targeted is not None:  # NetworkManager's object paths may mean other things now
            self.targeted.nm = nm
            self.targeted.forget()

    async def _follow_units(self, nm: NetworkManagerBus) -> None:
        """Subscribe to systemd's ``JobRemoved``: a unit listed in ``apps`` that starts after its
        connection came up is marked when it starts (without systemd: at the next re-sync)."""
        try:
            await nm.add_match(f"type='signal',sender='{SYSTEMD}',interface='{SYSTEMD_MANAGER}',member='JobRemoved'")
            await nm.add_match("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                               f"arg0='{SYSTEMD}'")
            await nm.call(SYSTEMD_PATH, SYSTEMD_MANAGER, "Subscribe", destination=SYSTEMD, timeout=5.0)
            self._systemd = await nm.name_owner(SYSTEMD)
        except NetworkManagerError as exc:
            self._systemd = None
            log.debug("not following systemd's unit jobs (%s): a unit listed in apps that starts later "
                      "is marked at the next re-sync", exc)

    async def _connect_with_backoff(self) -> bool:
        """Connect, retrying with growing delays; False if asked to stop meanwhile."""
        assert self._stop is not None
        delay, since, attempts = BACKOFF_FIRST, time.monotonic(), 0
        while not self.stopping:
            try:
                await self._connect()
                if attempts:
                    log.info("connected to the D-Bus system bus again after %.1f s", time.monotonic() - since)
                return True
            except NetworkManagerError as exc:
                attempts += 1
                (log.warning if attempts == 1 else log.debug)(
                    "cannot connect to the D-Bus system bus (%s); retrying in %.1f s", exc, delay)
            if await self._stopped_within(delay):
                return False
            delay = min(delay * 2, BACKOFF_MAX)
        return False

    async def _stopped_within(self, seconds: float) -> bool:
        assert self._stop is not None
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def _follow(self) -> bool:
        """Wait until the bus connection is lost (True) or we are asked to stop (False)."""
        assert self.nm is not None and self._stop is not None and self._lost is not None
        self._lost.clear()
        waits = [asyncio.ensure_future(f) for f in
                 (self.nm.wait_for_disconnect(), self._stop.wait(), self._lost.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waits:
                fut.cancel()
        return not self._stop.is_set()

    # ---- life cycle ----------------------------------------------------

    def _take_lock(self) -> None:
        if self._lock_fd is None:
            self._lock_fd = daemonlock.open_lock(self.engine.directory)
        daemonlock.acquire(self._lock_fd, self.engine.directory)

    def _drop_lock(self) -> None:
        """Let the dispatcher hook do the work while we cannot follow NetworkManager."""
        if self._lock_fd is not None:
            daemonlock.release(self._lock_fd)

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.wake, self._stop, self._lost = asyncio.Event(), asyncio.Event(), asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stop.set)
        self._take_lock()
        if not await self._connect_with_backoff():
            return
        threading.Thread(target=self._watch_netlink, name="netlink-watch", daemon=True).start()
        threading.Thread(target=self._watch_nftables, name="nftables-watch", daemon=True).start()
        self._start_cgroup_watch()
        tasks = [asyncio.ensure_future(self._safety_net()), asyncio.ensure_future(self._heartbeat())]
        if self.owner:
            await self.resync()
        else:
            log.warning("NetworkManager is not running; waiting for it")
        self.targeted = Targeted(self.nm, self.engine, self.executor)
        self.targeted.after_job = self._arm_cgroups  # an event with apps is a full reconcile: what waits may change
        await self.targeted.learn_all()
        self.handoff = HandoffServer(self.engine.directory, self._on_handoff)
        await self.handoff.start()
        worker = asyncio.ensure_future(self._resync_forever())
        sd_notify("READY=1\nSTATUS=following NetworkManager")
        log.info("nm-policy-routing daemon ready (NetworkManager is %s)", self.owner or "absent")
        while await self._follow() and await self._reconnect():
            pass
        log.info("stopping; the installed policies stay in place")
        sd_notify("STOPPING=1")
        self.handoff.close()
        self.stopping = True
        self.wake.set()
        for task in tasks:
            task.cancel()
        await worker
        await self.loop.run_in_executor(self.executor, self.resident.shutdown)
        if self._cgroups is not None:
            self.loop.remove_reader(self._cgroups.fd)
            self._cgroups.close()
        if self.nm is not None:
            self.nm.disconnect()

    async def _reconnect(self) -> bool:
        """The bus is lost: say so, step aside for the hook, reconnect, take the lock back, re-sync."""
        log.error("lost the connection to the D-Bus system bus: NetworkManager's changes are not followed "
                  "until it is back (the dispatcher hook acts meanwhile); reconnecting")
        sd_notify("STATUS=reconnecting to the D-Bus system bus")
        if self.nm is not None:
            self.nm.disconnect()
            self.nm = None
        self.owner = None
        self._drop_lock()
        if not await self._connect_with_backoff():
            return False
        self._take_lock()
        sd_notify("STATUS=following NetworkManager")
        if self.owner:
            self.schedule("reconnected to the bus")
        else:
            log.warning("NetworkManager is not running; waiting for it")
        return True


def run(engine: Engine) -> None:
    asyncio.run(Daemon(engine).run())
