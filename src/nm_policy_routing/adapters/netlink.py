"""The kernel's routing decisions as ``explain`` shows them, over netlink (pyroute2).

Every rule and route dump for the FIB model, and the kernel's own answer for one
packet. Reading and writing what is ours goes by adapters/rtnl.py (no pyroute2 on the
hook's and the daemon's paths). pyroute2 is imported here and nowhere else, lazily,
because importing it costs ~400 ms.
"""

from __future__ import annotations

import socket
from typing import Any, Dict, Optional

from .rtnl import _ifname

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}
U32 = 0xFFFFFFFF


def import_iproute():
    """pyroute2's IPRoute without pyroute2/__init__.py, which imports everything (~100 ms more).

    The package module is registered bare (its path only), so that submodules import
    on their own; a pyroute2 already imported in full is used as it is.
    """
    import importlib.util
    import sys
    import types

    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is not None and spec.submodule_search_locations:
            bare = types.ModuleType("pyroute2")
            bare.__path__ = list(spec.submodule_search_locations)
            bare.__spec__ = spec
            bare.__file__ = spec.origin
            sys.modules["pyroute2"] = bare
    from pyroute2.iproute.linux import IPRoute

    return IPRoute


def import_netlink_error():
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


class Netlink:
    """One netlink socket in the current network namespace."""

    def __init__(self) -> None:
        IPRoute = import_iproute()
        try:  # strict checking lets the kernel filter dumps (by protocol, table)
            self._ipr = IPRoute(strict_check=True)
        except TypeError:
            self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    # ---- for explain ---------------------------------------------------

    def fib_rules(self, destination: str) -> list:
        family = 6 if ":" in destination else 4
        return [_fib_rule(msg) for msg in self._ipr.get_rules(family=_AF[family])]

    def fib_routes(self, destination: str) -> dict:
        from .. import fib

        family = 6 if ":" in destination else 4
        tables: Dict[int, list] = {}
        for msg in self._ipr.route("dump", family=_AF[family]):
            dst = msg.get("dst")
            table = msg.get("table") or msg["table"]
            tables.setdefault(table, []).append(fib.FibRoute(
                table=table, dst=f"{dst}/{msg['dst_len']}" if dst else _DEFAULT[family], type=msg["type"],
                metric=msg.get("priority") or 0, gateway=msg.get("gateway"),
                oif=_ifname(msg.get("oif")) or None, prefsrc=msg.get("prefsrc"), protocol=msg["proto"]))
        return tables

    def route_get(self, destination: str, source: Optional[str], mark: int, uid: Optional[int] = None
                  ) -> Dict[str, Any]:
        """The kernel's own answer for a locally generated packet (of ``uid``'s socket)."""
        NetlinkError = import_netlink_error()

        if uid is not None:
            return _ip_route_get(destination, source, mark, uid)
        args: Dict[str, Any] = {"dst": destination}
        if source:
            args["src"] = source
        if mark:
            args["mark"] = mark
        try:
            msg = self._ipr.route("get", **args)[0]
        except NetlinkError as exc:
            return {"error": exc.args[1] if len(exc.args) > 1 else str(exc)}
        return {"table": msg.get("table") or msg["table"], "dev": _ifname(msg.get("oif")) or None,
                "gateway": msg.get("gateway"), "src": msg.get("prefsrc")}

def _ip_route_get(destination: str, source: Optional[str], mark: int, uid: int) -> Dict[str, Any]:
    """``ip route get ... uid U``: pyroute2 0.9.7's route message has no RTA_UID."""
    import json
    import subprocess

    args = ["ip", "-j", "route", "get", destination, "uid", str(uid)]
    if source:
        args += ["from", source]
    if mark:
        args += ["mark", str(mark)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=10)
    if proc.returncode:
        return {"error": proc.stderr.strip()}
    route = (json.loads(proc.stdout or "[]") or [{}])[0]
    return {"table": route.get("table", 254), "dev": route.get("dev"), "gateway": route.get("gateway"),
            "src": route.get("prefsrc")}


def _uid_range(text: Optional[str]) -> Dict[str, int]:
    """pyroute2 decodes FRA_UID_RANGE as 'START:END'; the kernel sends it only when set."""
    if not text:
        return {}
    start, _, end = str(text).partition(":")
    return {"uid_start": int(start), "uid_end": int(end)}


def _fib_rule(msg: Any) -> Any:
    """A rule message as the fib model's FibRule."""
    from .. import fib

    def prefix(key: str, length: int) -> Optional[str]:
        value = msg.get(key)
        return f"{value}/{length}" if value and length else None

    suppress = msg.get("suppress_prefixlen")
    return fib.FibRule(
        priority=msg.get("priority") or 0, table=msg.get("table") or msg["table"], action=msg["action"],
        src=prefix("src", msg["src_len"]), dst=prefix("dst", msg["dst_len"]),
        fwmark=msg.get("fwmark") or 0,
        fwmask=(msg.get("fwmask") if msg.get("fwmask") is not None else U32) if msg.get("fwmark") else 0,
        iif=msg.get("iifname"), oif=msg.get("oifname"), invert=bool(msg["flags"] & 2),
        suppress_prefixlen=-1 if suppress is None or suppress == U32 else suppress,
        protocol=msg.get("protocol") or 0,
        **_uid_range(msg.get("uid_range")),
    )
