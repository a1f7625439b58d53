"""Where cgroups are: the cgroup2 mount, a unit's cgroup directory, ``run --via``'s own cgroup,
and the ExecStartPre drop-in that marks each new cgroup of a listed service.

A unit's cgroup comes from systemd (``systemctl show -P ControlGroup``); it exists only
while the unit runs, and a restart makes a new one: hence the drop-in. On a hybrid host
(cgroup v1 controllers at /sys/fs/cgroup, cgroup2 at /sys/fs/cgroup/unified) the cgroup2
mount still carries the socket programs.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from typing import Optional

from ..errors import KernelError, NotPermittedError

log = logging.getLogger(__name__)

RUN_PREFIX = "nm-policy-routing-run."
_SAFE = re.compile(r"(/[A-Za-z0-9_.:@\\-]{1,255})+\Z")


def root() -> Optional[str]:
    """The cgroup2 mount point (/sys/fs/cgroup when unified), or None without cgroup2."""
    found = []
    try:
        with open("/proc/self/mountinfo") as handle:
            for line in handle:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    found.append(left.split(" ")[4].replace("\\040", " "))
    except OSError:
        return None
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in found:
            return preferred
    return found[0] if found else None


def hierarchy() -> str:
    """'unified', 'hybrid' (cgroup2 beside v1 controllers) or 'none'."""
    mount = root()
    if mount is None:
        return "none"
    return "unified" if mount == "/sys/fs/cgroup" else "hybrid"


def unit_property(unit: str, prop: str) -> Optional[str]:
    """A unit's property from systemd, or None when systemd cannot be asked."""
    import subprocess

    try:
        proc = subprocess.run(["systemctl", "show", "--property", prop, "--value", "--", unit],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def path_of(target: str) -> Optional[str]:
    """The cgroup directory of ``unit:NAME`` or ``cgroup:/PATH`` now, or None if it does not exist."""
    kind, _, value = target.partition(":")
    if kind == "unit":
        value = unit_property(value, "ControlGroup") or ""
    elif kind != "cgroup":
        return None
    path = _under_root(value)
    return path if path is not None and os.path.isdir(path) else None


def cgroup_dir(target: str) -> Optional[str]:
    """Where the directory of ``cgroup:/PATH`` is (or will be), None for another target."""
    kind, _, value = target.partition(":")
    return _under_root(value) if kind == "cgroup" else None


def _under_root(value: str) -> Optional[str]:
    mount = root()
    if mount is None or not _SAFE.match(value) or "/../" in value + "/" or "/./" in value + "/":
        return None
    return mount + value


# ---- run --via ---------------------------------------------------------------


def make_run_cgroup() -> str:
    """A fresh cgroup for one command (after removing empty ones left by a killed run)."""
    mount = root()
    if mount is None:
        raise KernelError("run --via needs cgroup v2, and this machine has no cgroup2 hierarchy mounted "
                          "(users still work: list them in nm-policy-routing.apps)")
    _remove_stale(mount)
    path = os.path.join(mount, f"{RUN_PREFIX}{os.getpid()}")
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except PermissionError as exc:
        raise NotPermittedError(f"cannot create cgroup {path}: not permitted (run as root, e.g. with sudo)") from exc
    return path


def populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.procs")) as handle:
            return bool(handle.read().strip())
    except OSError:
        return False


def remove_run_cgroup(path: str, wait: float = 5.0) -> None:
    """Remove the cgroup (its socket program goes with it); waits briefly for exiting processes."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cannot remove cgroup %s: %s", path, exc.strerror)
                return
            time.sleep(0.05)


def _remove_stale(mount: str) -> None:
    for name in os.listdir(mount):
        if not name.startswith(RUN_PREFIX):
            continue
        pid = name[len(RUN_PREFIX):]
        if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
            continue
        path = os.path.join(mount, name)
        if not populated(path):
            try:
                os.rmdir(path)
            except OSError:
                pass


def own() -> Optional[str]:
    """This process's cgroup directory in the cgroup2 tree (a unit's, for its ExecStartPre)."""
    mount = root()
    try:
        with open("/proc/self/cgroup") as handle:
            lines = [line.rstrip("\n") for line in handle if line.startswith("0::")]
    except OSError:
        return None
    if mount is None or not lines:
        return None
    path = lines[0][3:]
    if path.endswith("/.control"):  # a delegated unit's control processes run below it
        path = path[: -len("/.control")]
    return mount + path if _SAFE.match(path) else None


# ---- ExecStartPre drop-ins for listed services ---------------------------------------

DROPIN_DIR = "/etc/systemd/system"
DROPIN_NAME = "50-nm-policy-routing.conf"
DROPIN = """# Written by nm-policy-routing ('set CONNECTION apps unit:{unit}'); removed when the unit is no
# longer listed. Before {unit} starts, its cgroup gets the socket mark of the connection
# that lists it, when that connection is up; otherwise nothing happens.
[Service]
ExecStartPre=+-{exe} unit-start %n
"""


def systemd_booted() -> bool:
    return os.path.isdir("/run/systemd/system")


def sync_dropins(before: set, after: set, exe: str) -> list:
    """Drop-ins for the services in ``after`` and not for those only in ``before``; daemon-reload if changed.
    Returns what was done, one line each. Nothing without systemd as PID 1."""
    if not systemd_booted() or before == after:
        return []
    done = []
    for unit in sorted(after - before):
        directory = os.path.join(DROPIN_DIR, f"{unit}.d")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, DROPIN_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(DROPIN.format(unit=unit, exe=exe))
        os.replace(tmp, path)
        done.append(f"wrote {path}")
    for unit in sorted(before - after):
        path = os.path.join(DROPIN_DIR, f"{unit}.d", DROPIN_NAME)
        try:
            os.unlink(path)
            done.append(f"removed {path}")
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass
    if done:
        import subprocess

        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=60)
    return done
