"""Network namespaces with a per-run prefix, veth links, and the seed topology.

Nothing here touches the root namespace's networking: links are created inside
the namespaces (``ip -n NS link add ... peer ... netns OTHER``), sysctls are
written from inside them, and :meth:`Lab.close` removes every namespace it made.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable


def run(args: Sequence[str], check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def new_prefix() -> str:
    """A short per-run namespace prefix: 'npr' + 5 hex characters + '-'."""
    return f"npr{secrets.token_hex(3)[:5]}-"


@dataclass
class Netns:
    name: str

    def run(self, *args: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, *args], check=check, timeout=timeout, **kw)

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *args], check=check)

    def ipj(self, *args: str) -> Any:
        out = run(["ip", "-n", self.name, "-j", *args]).stdout.strip()
        return json.loads(out) if out else []

    def sysctl(self, key: str, value: Optional[int] = None) -> int:
        path = "/proc/sys/" + key.replace(".", "/") if "/" not in key else key
        if value is not None:
            self.sh(f"echo {int(value)} > '{path}'")
        return int(self.run("cat", path).stdout.strip())

    def conf(self, family: str, iface: str, key: str, value: Optional[int] = None) -> int:
        return self.sysctl(f"/proc/sys/net/{family}/conf/{iface}/{key}", value)

    def counters(self, iface: str) -> Dict[str, int]:
        link = self.ipj("-s", "link", "show", iface)[0]
        return {"tx": link["stats64"]["tx"]["packets"], "rx": link["stats64"]["rx"]["packets"]}

    def snapshot(self, ifaces: Sequence[str] = ()) -> Dict[str, Any]:
        """What must be equal before a policy and after its removal."""
        snap: Dict[str, Any] = {
            "rules4": self.ipj("-4", "rule"),
            "rules6": self.ipj("-6", "rule"),
            "routes4": self.ipj("-4", "route", "show", "table", "all"),
            "routes6": self.ipj("-6", "route", "show", "table", "all"),
            "nft": json.loads(self.run("nft", "-j", "list", "ruleset").stdout or "{}"),
        }
        for entry in snap["nft"].get("nftables", []):
            entry.pop("metainfo", None)
        for iface in ifaces:
            for key in ("src_valid_mark", "rp_filter"):
                snap[f"{iface}.{key}"] = self.conf("ipv4", iface, key)
        return snap


@dataclass
class Lab:
    """A set of namespaces made by one test, all removed by :meth:`close`."""

    prefix: str = field(default_factory=new_prefix)
    namespaces: List[Netns] = field(default_factory=list)

    def ns(self, short: str) -> Netns:
        ns = Netns(self.prefix + short)
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def link(self, a: Netns, a_if: str, b: Netns, b_if: str) -> None:
        a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
        a.ip("link", "set", a_if, "up")
        b.ip("link", "set", b_if, "up")

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "pids", ns.name], check=False)
            for pid in run(["ip", "netns", "pids", ns.name], check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class Seed:
    """The seed scenario: monitoring host -> router (anti-spoofing) -> host with eth0 + eth1.

    mon  10.0.9.2/24  fd00:9::2/64      (the monitoring subnet, reached via eth0)
    rtr  r-mon 10.0.9.1, r-mgmt 10.0.0.1, r-svc 10.0.1.1 (and fd00:N::1), strict
         rp_filter for IPv4 and an nft fib check for IPv6: spoofed sources drop
    host eth0 10.0.0.2/24 fd00:0::2/64  management; route to 10.0.9.0/24 via eth0
         eth1 10.0.1.2/24 fd00:1::2/64  service; the default route
    """

    lab: Lab
    mon: Netns
    rtr: Netns
    host: Netns

    #: an address behind the monitoring host, reached from the host by its default route
    REMOTE4 = "198.51.100.9"
    SERVICE4 = "10.0.1.2"
    SERVICE6 = "fd00:1::2"
    MON4 = "10.0.9.2"
    MON6 = "fd00:9::2"

    @classmethod
    def build(cls, lab: Lab, host_links: bool = True, address_host: bool = True) -> "Seed":
        """The three namespaces; ``address_host=False`` leaves eth0/eth1 unconfigured
        (for NetworkManager to configure)."""
        mon, rtr, host = lab.ns("mon"), lab.ns("rtr"), lab.ns("host")
        for ns in (mon, rtr, host):
            ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
            ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
        lab.link(mon, "eth0", rtr, "r-mon")
        mon.ip("addr", "add", "10.0.9.2/24", "dev", "eth0")
        mon.ip("addr", "add", "fd00:9::2/64", "dev", "eth0", "nodad")
        mon.ip("route", "add", "default", "via", "10.0.9.1")
        mon.ip("-6", "route", "add", "default", "via", "fd00:9::1")
        mon.ip("addr", "add", f"{cls.REMOTE4}/32", "dev", "lo")
        rtr.ip("addr", "add", "10.0.9.1/24", "dev", "r-mon")
        rtr.ip("addr", "add", "fd00:9::1/64", "dev", "r-mon", "nodad")
        rtr.ip("route", "add", f"{cls.REMOTE4}/32", "via", "10.0.9.2")
        rtr.sysctl("net.ipv4.ip_forward", 1)
        rtr.sysctl("net.ipv6.conf.all.forwarding", 1)
        rtr.sysctl("net.ipv4.conf.all.rp_filter", 1)
        rtr.sysctl("net.ipv4.conf.default.rp_filter", 1)
        rtr.sh("nft add table inet antispoof; "
               "nft add chain inet antispoof pre '{ type filter hook prerouting priority raw; }'; "
               "nft add rule inet antispoof pre ip6 saddr :: accept; "
               "nft add rule inet antispoof pre meta nfproto ipv6 fib saddr . iif oif missing counter drop")
        seed = cls(lab, mon, rtr, host)
        if host_links:
            seed.add_host_links(address_host)
        host.sysctl("net.ipv4.conf.all.rp_filter", 1)
        host.sysctl("net.ipv4.conf.default.rp_filter", 1)
        return seed

    def add_host_links(self, address_host: bool = True) -> None:
        rtr, host = self.rtr, self.host
        for n, (host_if, rtr_if) in enumerate((("eth0", "r-mgmt"), ("eth1", "r-svc"))):
            self.lab.link(host, host_if, rtr, rtr_if)
            rtr.ip("addr", "add", f"10.0.{n}.1/24", "dev", rtr_if)
            rtr.ip("addr", "add", f"fd00:{n}::1/64", "dev", rtr_if, "nodad")
            rtr.conf("ipv4", rtr_if, "rp_filter", 1)
            host.conf("ipv4", host_if, "rp_filter", 1)
        if address_host:
            self.address_host()

    def add_link(self, n: int, host_if: str) -> None:
        """Another host interface ``host_if`` = 10.0.N.2/24 towards the router (10.0.N.1)."""
        self.lab.link(self.host, host_if, self.rtr, f"r-x{n}")
        self.rtr.ip("addr", "add", f"10.0.{n}.1/24", "dev", f"r-x{n}")
        self.host.ip("addr", "add", f"10.0.{n}.2/24", "dev", host_if)

    def address_host(self) -> None:
        host = self.host
        host.ip("addr", "add", "10.0.0.2/24", "dev", "eth0")
        host.ip("addr", "add", "fd00:0::2/64", "dev", "eth0", "nodad")
        host.ip("addr", "add", "10.0.1.2/24", "dev", "eth1")
        host.ip("addr", "add", "fd00:1::2/64", "dev", "eth1", "nodad")
        host.ip("route", "add", "default", "via", "10.0.1.1", "dev", "eth1")
        host.ip("-6", "route", "add", "default", "via", "fd00:1::1", "dev", "eth1")
        host.ip("route", "add", "10.0.9.0/24", "via", "10.0.0.1", "dev", "eth0")
        host.ip("-6", "route", "add", "fd00:9::/64", "via", "fd00:0::1", "dev", "eth0")

    # ---- traffic -------------------------------------------------------

    def ping(self, dst: str, count: int = 2) -> bool:
        args = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", dst]
        return self.mon.run(*args, check=False, timeout=30).returncode == 0

    def tcp(self, dst: str, port: int = 8021) -> bool:
        """A TCP connection from the monitoring host to ``dst`` that carries data both ways."""
        return tcp_check(self.host, self.mon, dst, port)


TCPCHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tcpcheck.py")


def tcp_check(server: Netns, client: Netns, dst: str, port: int, timeout: float = 3) -> bool:
    bind = "::" if ":" in dst else "0.0.0.0"
    proc = subprocess.Popen(["ip", "netns", "exec", server.name, PYTHON, TCPCHECK, "serve", bind, str(port), "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # "ready"
        result = client.run(PYTHON, TCPCHECK, "connect", dst, str(port), str(timeout), check=False,
                            timeout=timeout + 10)
        return result.returncode == 0
    finally:
        proc.kill()
        proc.wait()


def wait_for(predicate, timeout: float = 10, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
