"""Pure: kernel entries -> the equivalent ``ip``/``nft``/``sysctl`` shell commands (for --dry-run).

Run by a shell in the same network namespace, the commands produce the same kernel
state as the reconcile that printed them.
"""

from __future__ import annotations

import json
from typing import Iterable, List

from . import nftjson
from .model import RT_PROTO, Fwmark, Mark, Route, Rule, SockMark, Sysctl


def _q(text: str) -> str:
    import shlex  # only --dry-run prints commands: the hook never pays for it

    return shlex.quote(text)


def rule(verb: str, entry: Rule) -> str:
    sel = []
    if entry.src:
        sel += ["from", f"{entry.src}/{entry.src_len}"]
    if entry.iif:
        sel += ["iif", entry.iif]
    if entry.fwmask:
        sel += ["fwmark", f"0x{entry.fwmark:x}/0x{entry.fwmask:x}"]
    if entry.uid_start >= 0:
        sel += ["uidrange", f"{entry.uid_start}-{entry.uid_end}"]
    words = ["ip", f"-{entry.family}", "rule", verb, "priority", str(entry.priority), *sel,
             "table", str(entry.table), "protocol", str(RT_PROTO)]
    line = " ".join(_q(w) for w in words)
    if entry.family == 6 and entry.uid_start >= 0 and verb == "add":
        line += "  # plus FIB_RULE_FIND_SADDR, which ip cannot set: without it, no unbound socket matches"
    return line


def route(verb: str, entry: Route) -> str:
    words = ["ip", f"-{entry.family}", "route", verb, entry.dst]
    if entry.gateway:
        words += ["via", entry.gateway]
    words += ["dev", entry.oif]
    if entry.prefsrc:
        words += ["src", entry.prefsrc]
    words += ["table", str(entry.table), "protocol", str(RT_PROTO)]
    return " ".join(_q(w) for w in words)


def sysctl(entry: Sysctl) -> str:
    # the slash form keeps dotted interface names (eth1.100) intact
    return f"sysctl -qw {_q(f'net/{entry.family}/conf/{entry.iface}/{entry.key}={entry.value}')}"


def nft_replace(marks: Iterable[Mark], exists: bool) -> str:
    marks = set(marks)
    if not marks:
        return "nft delete table inet nm_policy_routing" if exists else ""
    payload = json.dumps(nftjson.replace_table(marks, exists), separators=(",", ":"))
    return f"nft -j -f - <<'NFT'\n{payload}\nNFT"


def conntrack_flush(mark: Fwmark) -> str:
    return f"conntrack -D --mark 0x{mark.value:x}/0x{mark.mask:x} >/dev/null 2>&1 || true"


def sockmark(verb: str, entry: SockMark, path: str) -> str:
    """No shell tool does this without a pinned program: a comment saying what would be done."""
    where = path or f"{entry.target} (no cgroup now)"
    return (f"# {verb} the socket-mark program (BPF_CGROUP_INET_SOCK_CREATE, mark "
            f"0x{entry.value:x}/0x{entry.mask:x}) {'to' if verb == 'attach' else 'from'} cgroup {where}")


def script(lines: List[str]) -> str:
    body = [line for line in lines if line]
    return "\n".join(["set -e", *body]) + "\n" if body else ""
