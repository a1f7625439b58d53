"""Watch activations: does our rule and table route reach the kernel before NetworkManager
reports the connection ACTIVATED? Runs inside the lab's host namespace (stdlib + dbus-next).

usage: activation_watch.py UUID TABLE COUNT READY_FILE PROGRESS_FILE
Subscribes to netlink (rules, routes) and to ``Connection.Active.StateChanged`` on one
asyncio loop. When the ACTIVATED signal for UUID arrives, every netlink notification
already queued is read first: a notification the kernel sent before NetworkManager sent
its signal is then seen, one sent after is not. Per activation it records whether our
rule (protocol 214, TABLE) and our route in TABLE were present, and how long before the
signal the route arrived (or, when it came after, how late: ``late_ms``). Stops at the first deactivation after COUNT activations; prints JSON on stdout.
Touches READY_FILE once subscribed; appends a line to PROGRESS_FILE per DEACTIVATED signal
(then it forgets what it saw: a route may vanish with its address without a notification).
"""

import asyncio
import json
import socket
import struct
import sys
import time

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus
from nm_policy_routing.adapters.nlwire import nl_attrs  # the same netlink attribute walk

RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE = 0x40, 0x80
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 24, 25, 32, 33
RTA_TABLE, FRA_TABLE, FRA_PROTOCOL = 15, 15, 21
ACTIVE = "org.freedesktop.NetworkManager.Connection.Active"
ACTIVATED, DEACTIVATED = 2, 4


def parse(data: bytes, table: int):
    """(kind, present) for each of our rule/route notifications in a netlink datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type = struct.unpack_from("=IH", data, offset)
        body = data[offset + 16:offset + length]
        offset += (length + 3) & ~3
        if msg_type in (RTM_NEWROUTE, RTM_DELROUTE) and len(body) >= 12:
            proto, attrs = body[5], nl_attrs(body, 12)
            tid = struct.unpack("=I", attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else body[4]
            if proto == 214 and tid == table:
                yield "route", msg_type == RTM_NEWROUTE
        elif msg_type in (RTM_NEWRULE, RTM_DELRULE) and len(body) >= 12:
            attrs = nl_attrs(body, 12)
            proto = attrs.get(FRA_PROTOCOL, b"\0")[0]
            tid = struct.unpack("=I", attrs[FRA_TABLE])[0] if FRA_TABLE in attrs else body[4]
            if proto == 214 and tid == table:
                yield "rule", msg_type == RTM_NEWRULE


async def main() -> None:
    uuid, table, count, ready, progress = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    nl.bind((0, RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE))
    nl.setblocking(False)
    state = {"rule": False, "route": False, "route_at": None}

    def drain() -> None:
        while True:
            try:
                data = nl.recv(1 << 16)
            except BlockingIOError:
                return
            now = time.monotonic()
            for kind, present in parse(data, table):
                state[kind] = present
                if kind == "route" and present:
                    state["route_at"] = now
            waiting = state.get("waiting")
            if waiting and state["rule"] and state["route"]:  # it came after ACTIVATED: how late?
                waiting[0]["late_ms"] = round((now - waiting[1]) * 1000, 2)
                state["waiting"] = None

    loop = asyncio.get_running_loop()
    loop.add_reader(nl.fileno(), drain)
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    results = []
    done = asyncio.Event()

    async def record(path: str, snapshot: dict) -> None:
        reply = await bus.call(Message(destination="org.freedesktop.NetworkManager", path=path,
                                       interface="org.freedesktop.DBus.Properties", member="Get",
                                       signature="ss", body=[ACTIVE, "Uuid"]))
        if reply.message_type == MessageType.METHOD_RETURN and reply.body[0].value == uuid:
            results.append(snapshot)

    def on_message(msg) -> None:
        if msg.message_type != MessageType.SIGNAL or msg.interface != ACTIVE or msg.member != "StateChanged":
            return
        drain()  # what the kernel announced before this signal was sent is queued already
        if msg.body[0] == DEACTIVATED:  # a route may vanish with its address, unannounced
            state.update(rule=False, route=False, route_at=None, waiting=None)
            with open(progress, "a") as handle:
                handle.write("deactivated\n")
            if len(results) >= count:
                done.set()
            return
        if msg.body[0] != ACTIVATED:
            return
        now = time.monotonic()
        snapshot = {"path": msg.path, "rule": state["rule"], "route": state["route"],
                    "route_lead_ms": None if state["route_at"] is None
                    else round((now - state["route_at"]) * 1000, 2), "late_ms": None}
        if not (snapshot["rule"] and snapshot["route"]):
            state["waiting"] = (snapshot, now)
        asyncio.ensure_future(record(msg.path, snapshot))

    bus.add_message_handler(on_message)
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=[f"type='signal',interface='{ACTIVE}',member='StateChanged'"]))
    open(ready, "w").close()
    await done.wait()
    json.dump({"uuid": uuid, "activations": results}, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
