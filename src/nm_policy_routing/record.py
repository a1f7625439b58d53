"""The small on-disk record of what cannot be read back from the kernel.

``/run/nm-policy-routing/state.json`` (directory overridable with
``NM_POLICY_ROUTING_STATE_DIR``): the active connections we were told about, their
allocations, each sysctl's value before we changed it, and the last outcome per
connection for ``status``. Written atomically (temp file + rename); one file lock
serializes every process that reconciles.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional

from .model import Address, Allocation, Connection, ExtraRoute, Fwmark, Policy

log = logging.getLogger(__name__)

DEFAULT_DIR = "/run/nm-policy-routing"
VERSION = 1
_THREAD_LOCK = threading.RLock()


def state_dir(override: Optional[str] = None) -> str:
    return override or os.environ.get("NM_POLICY_ROUTING_STATE_DIR") or DEFAULT_DIR


def connection_to_json(conn: Connection) -> Dict[str, Any]:
    data = dict(conn.__dict__)  # its fields (asdict deep-copies: ~10x slower, and this runs per connection)
    data["addresses"] = [f"{a.ip}/{a.prefixlen}" for a in conn.addresses]
    data["user_data"] = dict(conn.user_data)
    return data


def connection_from_json(data: Dict[str, Any]) -> Connection:
    return Connection(
        uuid=str(data["uuid"]),
        id=str(data.get("id") or data["uuid"]),
        iface=str(data.get("iface") or ""),
        addresses=tuple(Address.parse(a) for a in data.get("addresses") or ()),
        gateway4=data.get("gateway4") or None,
        gateway6=data.get("gateway6") or None,
        user_data=tuple(sorted((str(k), str(v)) for k, v in (data.get("user_data") or {}).items())),
        type=str(data.get("type") or ""),
    )


def allocation_to_json(alloc: Allocation) -> Dict[str, Any]:
    fw = [alloc.fwmark.value, alloc.fwmark.mask] if alloc.fwmark else None
    return {"table": alloc.table, "priority": alloc.priority, "fwmark": fw}


def allocation_from_json(data: Dict[str, Any]) -> Allocation:
    fw = data.get("fwmark")
    return Allocation(int(data["table"]), int(data["priority"]), Fwmark(int(fw[0]), int(fw[1])) if fw else None)


def policy_to_json(policy: Policy) -> Dict[str, Any]:
    data = dict(policy.__dict__)  # its fields; asdict deep-copies (slow: this runs per policy)
    data["fwmark"] = [policy.fwmark.value, policy.fwmark.mask] if policy.fwmark else None
    data["match"] = sorted(policy.match)
    data["routes"] = [[r.prefix, r.via] for r in policy.routes]
    return data


def policy_from_json(data: Dict[str, Any]) -> Policy:
    fw = data.get("fwmark")
    return Policy(
        enable=bool(data["enable"]), table=data.get("table"), priority=data.get("priority"),
        fwmark=Fwmark(int(fw[0]), int(fw[1])) if fw else None, match=frozenset(data["match"]),
        src_valid_mark=bool(data["src_valid_mark"]), rp_filter=str(data["rp_filter"]),
        family=str(data["family"]), routes=tuple(ExtraRoute(p, v) for p, v in data.get("routes", [])),
    )


class Record:
    """The record's content; load with :meth:`load`, persist with :meth:`save`."""

    def __init__(self, directory: str, data: Optional[Dict[str, Any]] = None) -> None:
        self.directory = directory
        self.data: Dict[str, Any] = data or {}
        for key in ("connections", "allocations", "sysctls", "outcomes", "policies"):
            self.data.setdefault(key, {})
        self.data["version"] = VERSION
        #: a dry run reads the record but never writes it
        self.readonly = False

    @property
    def path(self) -> str:
        return os.path.join(self.directory, "state.json")

    @classmethod
    def load(cls, directory: str) -> "Record":
        path = os.path.join(directory, "state.json")
        try:
            with open(path) as handle:
                data = json.load(handle)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError("unknown format")
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable record %s (%s); the kernel state is re-read", path, exc)
            data = {}
        return cls(directory, data)

    def save(self) -> None:
        if self.readonly:
            return
        from .faults import fault_point

        fault_point("record")
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as handle:  # dumps: the C encoder (dump to a file is pure Python)
                handle.write(json.dumps(self.data, separators=(",", ":"), sort_keys=True))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

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
            yield
        finally:
            os.close(fd)
