"""The D-Bus listener: follow NetworkManager and keep every active connection's policy right.

Subscribe first, then snapshot and reconcile. A signal about one connection (its
state, its device's or IP configuration's properties) is acted on for that connection
alone (targeted.py); any other relevant signal (a profile edited or removed,
NetworkManager restarting) schedules one coalesced resync: snapshot all active
connections and reconcile. Netlink events (a link coming back, one of our routes or rules deleted)
schedule the same. Signals are accepted only from the current owner of
NetworkManager's bus name. While it runs, the daemon holds ``daemon.lock`` in the
state directory and serves ``handoff.sock`` there: the dispatcher hook hands each event
over and waits for the verified result (handoff.py, targeted.py), so on ``pre-up`` the
policy is in the kernel before NetworkManager reports the connection activated. All
engine work runs on one worker thread, in order.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Tuple

from .adapters.resident import Resident, trim_heap
from .adapters.networkmanager import ACTIVE, DEVICE, NM, PROPS, SETTINGS_CONN, NetworkManagerBus
from .errors import PolicyRoutingError
from .handoff import HandoffServer, Request
from .reconcile import Engine
from .targeted import Targeted

log = logging.getLogger(__name__)

SAFETY_RESYNC_SECONDS = 60
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

    # ---- signal intake -------------------------------------------------

    def _on_message(self, msg: Any) -> None:
        from dbus_next import MessageType

        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
            if msg.body and msg.body[0] == NM:
                self.owner = msg.body[2] or None
                log.info("NetworkManager %s", "appeared" if self.owner else "went away")
                if self.targeted is not None:
                    self.targeted.forget()
                if self.owner:
                    self.schedule("NetworkManager (re)started")
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
        assert self.nm is not None and self.loop is not None
        try:
            if await self.nm.starting_up():
                log.info("NetworkManager is still starting up; waiting before re-syncing")
                return
            conns = await self.nm.active_connections()
        except PolicyRoutingError as exc:
            log.error("cannot read NetworkManager's active connections: %s", exc)
            return
        try:
            result = await self.loop.run_in_executor(self.executor, self._reconcile_all, conns)
        except PolicyRoutingError as exc:
            log.error("reconcile failed: %s", exc)
            return
        except Exception:  # the per-event fence: log, keep serving
            log.exception("unexpected error while reconciling; the daemon keeps running")
            return
        for change in result.changes:
            log.info("%s", change)
        for uuid, errors in result.errors.items():
            for error in errors:
                log.error("%s", error)
        if self.targeted is not None:
            await self.targeted.learn_all()

    def _reconcile_all(self, conns):
        self.resident.forget_all()  # the safety net: everything read from the kernel again
        try:
            return self.engine.reconcile(conns)
        finally:
            trim_heap()

    async def _on_handoff(self, request: Request) -> Tuple[str, str]:
        """An event the dispatcher hook handed over: act on that connection alone, then answer."""
        assert self.targeted is not None
        try:
            verdict, text = await self.targeted.handle(request)
        except Exception:  # the per-event fence: log, let the hook act itself
            log.exception("unexpected error on %s; the hook acts itself", request)
            return "fallback", "unexpected error in the daemon (see its log)"
        log.info("%s", text)
        return verdict, text

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
                for text in dict.fromkeys(e.text for e in events if e.resync):
                    self.schedule(text)
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

    # ---- life cycle ----------------------------------------------------

    def _take_lock(self) -> None:
        os.makedirs(self.engine.directory, exist_ok=True)
        fd = os.open(os.path.join(self.engine.directory, "daemon.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(20):  # the hook takes the lock for an instant to test it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            os.close(fd)
            raise PolicyRoutingError(
                f"another nm-policy-routing daemon already runs (lock {self.engine.directory}/daemon.lock)")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self._take_lock()
        self.nm = await NetworkManagerBus().connect()
        self.nm.on_message(self._on_message)
        await self.nm.add_match(f"type='signal',sender='{NM}'")
        await self.nm.add_match("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                                f"arg0='{NM}'")
        self.owner = await self.nm.name_owner()
        threading.Thread(target=self._watch_netlink, name="netlink-watch", daemon=True).start()
        threading.Thread(target=self._watch_nftables, name="nftables-watch", daemon=True).start()
        safety = asyncio.ensure_future(self._safety_net())
        if self.owner:
            await self.resync()
        else:
            log.warning("NetworkManager is not running; waiting for it")
        self.targeted = Targeted(self.nm, self.engine, self.executor)
        await self.targeted.learn_all()
        self.handoff = HandoffServer(self.engine.directory, self._on_handoff)
        await self.handoff.start()
        worker = asyncio.ensure_future(self._resync_forever())
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        sd_notify("READY=1\nSTATUS=following NetworkManager")
        log.info("nm-policy-routing daemon ready (NetworkManager is %s)", self.owner or "absent")
        await stop.wait()
        log.info("stopping; the installed policies stay in place")
        sd_notify("STOPPING=1")
        self.handoff.close()
        self.stopping = True
        self.wake.set()
        safety.cancel()
        await worker
        await self.loop.run_in_executor(self.executor, self.resident.shutdown)
        self.nm.disconnect()


def run(engine: Engine) -> None:
    asyncio.run(Daemon(engine).run())
