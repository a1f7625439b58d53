"""The small on-disk record of what cannot be read back from the kernel.

``/run/nm-policy-routing/state.json`` (directory overridable with
``NM_POLICY_ROUTING_STATE_DIR``): the active connections we were told about, their
allocations, each sysctl's value before we changed it, and the last outcome per
connection for ``status``. Written atomically (temp file + rename); one file lock
serializes every process that reconciles.

One connection's event must not cost O(N): the daemon's one-connection path saves only
the entries it changed, each as one file ``state.d/<section>.<key>`` (atomic, like the
base) that names the ``state.json`` it applies to (inode, size, mtime). Loading reads
``state.json`` and applies those files on top; a full save (every full reconcile, and
when the files grow past a bound) writes ``state.json`` whole and removes them. Files
naming another ``state.json`` (a crash between the two steps of a full save, or a
process of 0.2.0 that wrote the base whole during an upgrade) are stale: ignored, and
removed at the next save. ``state.json`` keeps 0.2.0's format (0.2.0's record loads as
it is; 0.2.0 reads the base). Each save also counts up a generation in the lock file, so
a process keeping a record in memory sees any other writer's save.

The record is checked on load. A damaged one (not JSON, another version, or any entry of
the wrong type or out of range) is set aside as ``state.json.damaged-<time>`` at the next
write, logged, and rebuilt: what is ours is read from the kernel anyway (rules and routes
tagged with our protocol, our nft table), and the allocations of the connections applied
again are taken from there (by interface) so their tables and marks do not move.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from .model import (MATCH_KINDS, Address, Allocation, App, Connection, ExtraRoute, Fwmark, KernelState, Policy,
                    real_gateway)
from .recordfiles import (OVERLAYS, Stamp, Tracked, apply_overlays, count_save, event_name, event_seq, generation,
                          read_overlays, remove_leftovers, stamp_of, write_atomic)

log = logging.getLogger(__name__)

DEFAULT_DIR = "/run/nm-policy-routing"
VERSION = 1
_THREAD_LOCK = threading.RLock()
_HELD = threading.local()  # .depth: how many locked() this thread is in
#: a full save (state.json whole) when the files of saves since outnumber this plus twice the connections
OVERLAY_SLACK = 64


def state_dir(override: Optional[str] = None) -> str:
    return override or os.environ.get("NM_POLICY_ROUTING_STATE_DIR") or DEFAULT_DIR


def connection_to_json(conn: Connection) -> Dict[str, Any]:
    data = dict(conn.__dict__)  # its fields (asdict deep-copies: ~10x slower, and this runs per connection)
    data["addresses"] = [f"{a.ip}/{a.prefixlen}" for a in conn.addresses]
    data["user_data"] = dict(conn.user_data)
    return data


def _gateway(value: Any) -> Optional[str]:
    """A recorded gateway: an address (else the record is damaged: ValueError); 0.0.0.0/:: mean none."""
    return real_gateway(str(ipaddress.ip_address(value))) if value else None


def connection_from_json(data: Dict[str, Any]) -> Connection:
    if not isinstance(data["uuid"], str) or not isinstance(data.get("addresses") or [], list):
        raise ValueError("uuid must be a string and addresses a list")
    return Connection(
        uuid=str(data["uuid"]),
        id=str(data.get("id") or data["uuid"]),
        iface=str(data.get("iface") or ""),
        addresses=tuple(Address.parse(a) for a in data.get("addresses") or ()),
        gateway4=_gateway(data.get("gateway4")),
        gateway6=_gateway(data.get("gateway6")),
        user_data=tuple(sorted((str(k), str(v)) for k, v in (data.get("user_data") or {}).items())),
        type=str(data.get("type") or ""),
    )


def allocation_to_json(alloc: Allocation) -> Dict[str, Any]:
    fw = [alloc.fwmark.value, alloc.fwmark.mask] if alloc.fwmark else None
    return {"table": alloc.table, "priority": alloc.priority, "fwmark": fw}


_U32 = 0xFFFFFFFF
_RESERVED_TABLES = (0, 253, 254, 255)


def _int(value: Any, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{what} {value!r} is not an integer in {low}..{high}")
    return value


def _table(value: Any) -> int:
    if _int(value, 1, _U32, "table") in _RESERVED_TABLES:
        raise ValueError(f"table {value} is reserved")
    return value


def _fwmark(data: Any) -> Optional[Fwmark]:
    if data is None:
        return None
    if not isinstance(data, list) or len(data) != 2:
        raise ValueError(f"fwmark {data!r} is not [value, mask]")
    value, mask = _int(data[0], 1, _U32, "fwmark"), _int(data[1], 1, _U32, "fwmask")
    if value & ~mask:
        raise ValueError(f"fwmark 0x{value:x} is outside its mask 0x{mask:x}")
    return Fwmark(value, mask)


def allocation_from_json(data: Dict[str, Any]) -> Allocation:
    return Allocation(_table(data["table"]), _int(data["priority"], 1, 32765, "priority"),
                      _fwmark(data.get("fwmark")))


def policy_to_json(policy: Policy) -> Dict[str, Any]:
    data = dict(policy.__dict__)  # its fields; asdict deep-copies (slow: this runs per policy)
    data["fwmark"] = [policy.fwmark.value, policy.fwmark.mask] if policy.fwmark else None
    data["match"] = sorted(policy.match)
    data["routes"] = [[r.prefix, r.via] for r in policy.routes]
    data["apps"] = [[a.kind, a.value, a.name] for a in policy.apps]
    return data


def _choice(value: Any, accepted: Iterable[str], what: str) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(accepted)}")
    return value


def _app(item: Any) -> App:
    """An ``apps`` entry, checked again by the policy parser's own rules."""
    from .policy import U32, _app as parse_app

    kind, value, name = item
    if kind == "uid":
        if not (isinstance(value, str) and value.isascii() and value.isdigit() and int(value) < U32):
            raise ValueError(f"uid {value!r} is not a uid")
        return App("uid", str(int(value)), str(name))
    app = parse_app(f"{kind}:{value}")
    if app.kind != kind or app.value != value:
        raise ValueError(f"apps entry {kind}:{value} is not in its canonical form")
    return app


def _extra_route(item: Any) -> ExtraRoute:
    prefix, via = item
    network = ipaddress.ip_network(prefix)
    if via is not None and ipaddress.ip_address(via).version != network.version:
        raise ValueError(f"route {prefix} via {via}: families differ")
    return ExtraRoute(str(network), via)


def policy_from_json(data: Dict[str, Any]) -> Policy:
    """A cached policy, checked again (the record is not trusted more than the kernel is)."""
    if type(data["enable"]) is not bool or type(data["src_valid_mark"]) is not bool:
        raise ValueError("enable and src_valid_mark must be true or false")
    match = data["match"]
    if not isinstance(match, list) or not match or any(m not in MATCH_KINDS for m in match):
        raise ValueError(f"match {match!r} is not a list of {', '.join(MATCH_KINDS)}")
    table, priority = data.get("table"), data.get("priority")
    return Policy(
        enable=data["enable"], table=None if table is None else _table(table),
        priority=None if priority is None else _int(priority, 1, 32765, "priority"),
        fwmark=_fwmark(data.get("fwmark")), match=frozenset(match), src_valid_mark=data["src_valid_mark"],
        rp_filter=_choice(data["rp_filter"], ("keep", "off", "strict", "loose"), "rp_filter"),
        family=_choice(data["family"], ("ipv4", "ipv6", "both"), "family"),
        routes=tuple(_extra_route(item) for item in data.get("routes", [])),
        apps=tuple(_app(item) for item in data.get("apps", [])),
    )


_SECTIONS = ("connections", "allocations", "sysctls", "outcomes", "policies")


def _sysctl_original(key: Any, value: Any) -> int:
    if not isinstance(key, str) or len(key.split("/")) != 3 or key.split("/")[0] not in ("ipv4", "ipv6"):
        raise ValueError(f"sysctl slot {key!r} is not family/interface/key")
    return _int(value, -(2 ** 31), 2 ** 31 - 1, f"original value of {key}")


def damage(data: Any) -> Optional[str]:
    """What is wrong with a record's content, or None when every entry reads back."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("version") != VERSION:
        return f"version {data.get('version')!r}, expected {VERSION}"
    checks: Dict[str, Callable[[Any, Any], Any]] = {
        "connections": lambda k, v: connection_from_json(v),
        "allocations": lambda k, v: allocation_from_json(v),
        "sysctls": _sysctl_original,
        "outcomes": lambda k, v: v if isinstance(v, dict) and isinstance(v.get("errors", []), list)
        and isinstance(v.get("status", ""), str) else _raise(ValueError("not an outcome")),
        "policies": lambda k, v: policy_from_json(v),
    }
    for section in _SECTIONS:
        entries = data.get(section, {})
        if not isinstance(entries, dict):
            return f"section {section!r} is a {type(entries).__name__}, not an object"
        for key, value in entries.items():
            try:
                checks[section](key, value)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                return f"{section} entry {key!r}: {exc!r}"
    return None


def _raise(exc: Exception) -> Any:
    raise exc


def allocations_from_kernel(current: KernelState) -> Dict[str, Allocation]:
    """interface -> the allocation our tagged entries on it show (for a record rebuilt from the
    kernel): the table of its routes, the priority of that table's rules, the mark of its nft
    elements."""
    tables: Dict[str, int] = {}
    for route in sorted(current.routes):
        tables.setdefault(route.oif, route.table)
    priorities: Dict[int, int] = {}
    for rule in sorted(current.rules):
        priorities.setdefault(rule.table, rule.priority)
    marks = {m.iface: Fwmark(m.value, m.mask) for m in sorted(current.marks)}
    out = {}
    for iface, table in tables.items():
        if table in priorities and table not in _RESERVED_TABLES:
            out[iface] = Allocation(table, priorities[table], marks.get(iface))
    return out


class Record:
    """The record's content; load with :meth:`load`, persist with :meth:`save`."""

    def __init__(self, directory: str, data: Optional[Dict[str, Any]] = None) -> None:
        self.directory = directory
        self.data: Dict[str, Any] = data or {}
        for key in _SECTIONS:
            self.data[key] = Tracked(self.data.get(key) or {})
        self.data["version"] = VERSION
        #: a dry run reads the record but never writes it
        self.readonly = False
        #: why the record on disk was not used (it is set aside at the next write), or None
        self.damaged: Optional[str] = None
        #: the state.json the files of saves since apply to (None: none on disk yet)
        self.base: Optional[Stamp] = None
        #: the files of saves on disk that apply to it, and those that are stale
        self._overlays: set = set()
        self._stale: set = set()

    @property
    def path(self) -> str:
        return os.path.join(self.directory, "state.json")

    @classmethod
    def load(cls, directory: str) -> "Record":
        path = os.path.join(directory, "state.json")
        problem = None
        base: Optional[Stamp] = None
        overlays: List[Tuple[str, List[Dict[str, Any]]]] = []
        stale: set = set()
        try:
            with _reading(directory):
                try:
                    with open(path) as handle:
                        data = json.load(handle)
                        base = stamp_of(os.fstat(handle.fileno()))
                except FileNotFoundError:
                    data = {}
                overlays, stale = read_overlays(directory, base, _SECTIONS)
            if base is not None:
                apply_overlays(data, (entries for _, entries in overlays))
                problem = damage(data)
        except (OSError, ValueError, AttributeError) as exc:
            problem = f"unreadable: {exc}"
        if problem:
            log.error("the record %s is damaged (%s): it is not used; what is ours is re-read from the "
                      "kernel, and the record is rebuilt at the next change (the damaged file is kept "
                      "beside it)", path, problem)
            record = cls(directory, {})
            record.damaged = problem
            return record
        record = cls(directory, data)
        record.base, record._overlays, record._stale = base, {name for name, _ in overlays}, stale
        return record

    def _set_aside(self) -> None:
        suffix = f"damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        for name in ("state.json", OVERLAYS):
            path = os.path.join(self.directory, name)
            try:
                os.replace(path, f"{path}.{suffix}")
            except FileNotFoundError:
                continue
            log.error("set the damaged record aside as %s.%s (%s); a new one is written from the kernel's "
                      "state and the active connections", path, suffix, self.damaged)
        self.damaged = None
        self._overlays, self._stale = set(), set()

    def save(self, changes_only: bool = False) -> None:
        """Write the record: whole (``state.json``), or with ``changes_only`` just the entries
        changed since it was loaded or saved (one file each; whole when that is not possible)."""
        if self.readonly:
            return
        from .faults import fault_point

        fault_point("record")
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        if self.damaged:
            self._set_aside()
        if not (changes_only and self._save_changes()):
            self._save_whole()
        count_save(self.directory)

    def _save_whole(self) -> None:
        write_atomic(self.directory, "state.json", json.dumps(self.data, separators=(",", ":"), sort_keys=True))
        self.base = stamp_of(os.stat(self.path))  # dumps: the C encoder (dump to a file is pure Python)
        for name in self._overlays | self._stale:  # they are in state.json now (or stale)
            try:
                os.unlink(os.path.join(self.directory, OVERLAYS, name))
            except FileNotFoundError:
                pass
        self._overlays, self._stale = set(), set()
        remove_leftovers(self.directory)
        for section in _SECTIONS:
            self.data[section] = Tracked(self.data[section])

    def _save_changes(self) -> bool:
        """The changed entries, in one file (one event's changes are saved all or none); False
        when the whole record must be written."""
        sections = [self.data[s] for s in _SECTIONS]
        if self.base is None or not all(isinstance(s, Tracked) for s in sections):
            return False
        if len(self._overlays) >= OVERLAY_SLACK + 2 * len(self.data["connections"]):
            return False  # fold them into state.json (amortized: one full save per many events)
        entries = []
        for section in _SECTIONS:
            for key in sorted(self.data[section].changed):
                entry: Dict[str, Any] = {"section": section, "key": key}
                if key in self.data[section]:
                    entry["value"] = self.data[section][key]
                entries.append(entry)
        folder = os.path.join(self.directory, OVERLAYS)
        if entries:
            os.makedirs(folder, mode=0o755, exist_ok=True)
            # after every file on disk: the saves' count, unless a file says more (a lock file re-made)
            seq = 1 + max([generation(self.directory)] + [event_seq(n) for n in self._overlays | self._stale])
            name = event_name(seq)
            write_atomic(folder, name, json.dumps({"base": list(self.base), "entries": entries},
                                                  separators=(",", ":"), sort_keys=True))
            self._overlays.add(name)
        for name in self._stale - self._overlays:  # (once after another process wrote state.json whole)
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass
        self._stale = set()
        for section in sections:
            section.changed = set()
        return True

    # ---- typed views ---------------------------------------------------

    def connections(self) -> Dict[str, Connection]:
        return self._decoded("connections", connection_from_json)

    def set_connections(self, conns: Dict[str, Connection]) -> None:
        self.data["connections"] = {u: connection_to_json(c) for u, c in conns.items()}

    def _decoded(self, section: str, decode: Callable[[Any], Any]) -> Dict[str, Any]:
        """A section's entries decoded; an unreadable entry is dropped (it is re-derived)."""
        out = {}
        for key, data in self.data[section].items():
            try:
                out[key] = decode(data)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                log.warning("dropping unreadable %s entry %s from the record: %s", section, key, exc)
        return out

    def allocations(self) -> Dict[str, Allocation]:
        return self._decoded("allocations", allocation_from_json)

    def set_allocations(self, allocs: Dict[str, Allocation]) -> None:
        self.data["allocations"] = {u: allocation_to_json(a) for u, a in allocs.items()}

    def policies(self) -> Dict[str, Policy]:
        """Policies validated before, by planner.policy_key (so the hook need not load pydantic)."""
        return self._decoded("policies", policy_from_json)

    def set_policies(self, policies: Dict[str, Policy]) -> None:
        self.data["policies"] = {k: policy_to_json(p) for k, p in policies.items()}

    def sysctl_originals(self) -> Dict[str, int]:
        """slot "family/iface/key" -> the value before we first changed it."""
        return {k: int(v) for k, v in self.data["sysctls"].items()}

    def set_outcome(self, uuid: str, outcome: Dict[str, Any]) -> None:
        outcome = dict(outcome, time=time.time())
        self.data["outcomes"][uuid] = outcome


@contextmanager
def locked(directory: str) -> Iterator[None]:
    """Hold the one lock every reconcile runs under (threads and processes)."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    with _THREAD_LOCK:
        fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _HELD.depth = getattr(_HELD, "depth", 0) + 1
            try:
                yield
            finally:
                _HELD.depth -= 1
        finally:
            os.close(fd)


@contextmanager
def _reading(directory: str) -> Iterator[None]:
    """A load sees one save whole: ``state.json`` and the ``state.d`` entries written with it
    (a save replaces the one and removes or adds the others, under the lock). A thread that
    holds the lock reads as it is; any other takes it shared for the read (it waits for a
    save in progress). Without a lock file nobody ever saved; one we may not open (not
    root) is read as it is."""
    if getattr(_HELD, "depth", 0):
        yield
        return
    try:
        fd = os.open(os.path.join(directory, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
