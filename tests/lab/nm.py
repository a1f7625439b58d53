"""A real NetworkManager, on a private D-Bus system bus, in the host namespace of a Seed.

Its single job: give end-to-end tests and the demo a NetworkManager that manages the
seed's eth0/eth1 (and a DHCP server for eth1), without touching the machine's own
networking, D-Bus or NetworkManager state.

How it is isolated:

- the bus is a ``dbus-daemon`` of type ``system`` listening on a socket in the base
  directory; everything started here gets ``DBUS_SYSTEM_BUS_ADDRESS`` for it;
- NetworkManager runs as ``ip netns exec HOST unshare -m --propagation private SCRIPT``:
  it sees only the host namespace's links, ``/sys`` is read-only (so it does not wait
  for udev), and private directories of the base directory are bind-mounted over
  ``/run/NetworkManager``, ``/var/lib/NetworkManager``,
  ``/etc/NetworkManager/dispatcher.d`` (tests drop scripts into :attr:`NMLab.dispatcher_dir`)
  and ``/run/dbus`` (so dispatcher scripts, which get no ``DBUS_SYSTEM_BUS_ADDRESS``,
  reach the lab bus at the default address);
- its configuration, keyfiles, state file and log live in the base directory
  (``nm.log``, ``dispatcher.log``, ``dbus.log``, ``dnsmasq.log``).

With ``root`` (a directory holding another Debian system, e.g. a debootstrap tree), the
NetworkManager, nm-dispatcher and nmcli of that system run, and so does every command
given to :meth:`NMLab.run_in_host`: in NetworkManager's private mount namespace, the base
directory (and every bind source) is bind-mounted into ROOT at the same path, /proc,
/dev, a read-only /sys and a tmpfs on /run are mounted there, then the start script runs
under ``chroot ROOT``. Commands run with ``nsenter -t <NetworkManager's PID> -m -n -r -w``:
the same mounts, network namespace and root. The dispatcher finds the scripts ROOT's
packages installed in ROOT's /usr/lib/NetworkManager/dispatcher.d.

Every process is ended by its PID (SIGTERM, then SIGKILL); nothing is looked up by name.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import signal
import subprocess
from typing import Any, Dict, List, Mapping, Optional

from tests.lab.netns import Netns, Seed, run, wait_for

MGMT_UUID = "5e1f0000-0000-4000-8000-00000000e700"
SERVICE_UUID = "5e1f0000-0000-4000-8000-00000000e701"
DHCP_UUID = "5e1f0000-0000-4000-8000-00000000d4c1"

NM_BIN = "/usr/sbin/NetworkManager"
DISPATCHER_BIN = "/usr/lib/NetworkManager/nm-dispatcher"
DISPATCHER_BINS = (DISPATCHER_BIN, "/usr/libexec/nm-dispatcher")  # Debian 12, Debian 13
ROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
DNSMASQ_BIN = "/usr/sbin/dnsmasq"
DISPATCHER_NAME = "org.freedesktop.nm_dispatcher"
MOUNTED_OVER = ("/run/NetworkManager", "/var/lib/NetworkManager", "/etc/NetworkManager/dispatcher.d", "/run/dbus")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)

DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""

NM_CONFIG = """[main]
plugins=keyfile
no-auto-default=*
auth-polkit=false
dns=none
rc-manager=unmanaged
hostname-mode=none

[keyfile]
path={keyfiles}

[connectivity]
enabled=false

[logging]
level=INFO
backend=debug
"""

# Runs as `ip netns exec HOST unshare -m --propagation private sh SCRIPT`, so every
# mount below is private to NetworkManager and its dispatcher. `ip netns exec` already
# mounted a /sys of the host namespace; read-only, NetworkManager does not wait for udev.
# /run/dbus becomes the lab bus's directory: dispatcher scripts get no DBUS_SYSTEM_BUS_ADDRESS
# (nm-dispatcher passes them only NetworkManager's variables and its own PATH), so the
# default system bus address must lead to the lab bus.
# The only traces outside: empty mountpoints (/run/NetworkManager, ...) if there were none.
# --debug sends the log to stderr (with --no-daemon alone it goes to syslog/journal).
START_SCRIPT = """#!/bin/sh
set -eu
mount -o remount,ro /sys
mkdir -p /run/NetworkManager /run/dbus
mount --bind {run_dir} /run/NetworkManager
mount --bind {lib_dir} /var/lib/NetworkManager
mount --bind {dispatcher_dir} /etc/NetworkManager/dispatcher.d
mount --bind {bus_dir} /run/dbus
{extra_binds}{dispatcher} --persist --debug >>{dispatcher_log} 2>&1 &
echo $! >{dispatcher_pid}
n=0
until dbus-send --system --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \\
        org.freedesktop.DBus.GetNameOwner string:{dispatcher_name} >/dev/null 2>&1; do
    n=$((n + 1))
    if [ "$n" -gt 200 ]; then echo "nm-dispatcher did not register on the bus" >&2; exit 1; fi
    sleep 0.05
done
exec {nm} --no-daemon --debug --config={config} --config-dir={conf_d} --system-config-dir={conf_d} \\
    --intern-config={lib_dir}/NetworkManager-intern.conf --state-file={state_file}
"""


# With a root: runs as `ip netns exec HOST unshare -m --propagation private sh SCRIPT`
# (the mounts are private to NetworkManager's mount namespace and vanish with it), then
# the start script runs in ROOT, where every path of the base directory stays valid.
ENTER_ROOT_SCRIPT = """#!/bin/sh
set -eu
{binds}mount -t proc proc {root}/proc
mount --rbind /dev {root}/dev
mount -t sysfs -o ro sysfs {root}/sys
mount -t tmpfs -o mode=0755 tmpfs {root}/run
exec chroot {root} /bin/sh {start}
"""


class NMLabError(RuntimeError):
    """Something in the lab failed; the message carries the tail of the relevant log."""


class NMLab:
    """NetworkManager + nm-dispatcher + a private system bus for one :class:`Seed`.

    ``with NMLab(seed, base_dir) as nm: nm.seed_keyfiles(); nm.up("service")``.
    The base directory (created if missing) holds every file of the lab; it may be
    reused by a later lab, but not shared by two at once.
    """

    DEVICES = ("eth0", "eth1")

    def __init__(self, seed: Seed, base_dir: str, env: Optional[Mapping[str, str]] = None,
                 binds: Optional[Mapping[str, str]] = None, root: Optional[str] = None) -> None:
        """``env``: extra environment for everything started (the dispatcher's PATH is the
        only variable its scripts inherit). ``binds``: {path seen by NetworkManager, its
        dispatcher and their scripts: directory bind-mounted there}, e.g. a state directory.
        ``root``: run the NetworkManager (and every command) of the system in this directory."""
        self.seed = seed
        self.root = os.path.realpath(root) if root else None
        if self.root and not os.path.isfile(self.root + NM_BIN):
            raise ValueError(f"root {self.root} has no {NM_BIN}: install network-manager there")
        self._root_mountpoints: List[str] = []
        self.base = os.path.abspath(base_dir)
        self.extra_env = dict(env or {})
        self.binds = {target: os.path.abspath(source) for target, source in (binds or {}).items()}
        if not all(os.path.isabs(target) for target in self.binds):
            raise ValueError(f"bind targets must be absolute paths: {list(self.binds)}")
        mounted_in_root = ("/run", "/proc", "/sys", "/dev") if self.root else ()
        for hidden in (*MOUNTED_OVER, *self.binds, *mounted_in_root):
            if self.base == hidden or self.base.startswith(hidden + "/"):
                raise ValueError(f"base_dir {self.base} must not be under {hidden} (it is mounted over)")
        self.keyfile_dir = self._path("keyfiles")
        self.dispatcher_dir = self._path("dispatcher.d")
        self.run_dir = self._path("run")
        self.lib_dir = self._path("lib")
        self.nm_log = self._path("nm.log")
        self.dispatcher_log = self._path("dispatcher.log")
        self.dbus_log = self._path("dbus.log")
        self.dnsmasq_log = self._path("dnsmasq.log")
        self.dhcp_lease_file = self._path("dnsmasq.leases")
        self.bus_dir = self._path("dbus")
        self.bus_socket = os.path.join(self.bus_dir, "system_bus_socket")
        self._bus: Optional[subprocess.Popen] = None
        self._nm: Optional[subprocess.Popen] = None
        self._dnsmasq: Optional[subprocess.Popen] = None
        self._dispatcher_pid: Optional[int] = None
        self._dhcp_restarts = 0

    # ---- paths and environment --------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.base, name)

    @property
    def host(self) -> Netns:
        return self.seed.host

    @property
    def nm_pid(self) -> Optional[int]:
        return self._nm.pid if self._nm is not None else None

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.bus_socket}"

    def env(self) -> Dict[str, str]:
        """The environment for a process that talks to this lab's bus (and NetworkManager);
        with a root, nothing of this machine's environment but the lab's variables."""
        env = dict(ROOT_ENV) if self.root else dict(os.environ)
        env.update(self.extra_env)
        env.update(DBUS_SYSTEM_BUS_ADDRESS=self.bus_address, LC_ALL="C")
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        return env

    def run_in_host(self, *args: str, env: Optional[Mapping[str, str]] = None, check: bool = True,
                    timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
        """Run a command in the host namespace with the lab bus environment (plus ``env``);
        with a root, in NetworkManager's mount namespace and root directory too."""
        full = self.env()
        full.update(env or {})
        if self.root:
            if self.nm_pid is None:
                raise NMLabError(f"NetworkManager is not running: cannot run {args[0]} in {self.root}")
            return run(["nsenter", "-t", str(self.nm_pid), "-m", "-n", "-r", "-w", "--", *args],
                       check=check, timeout=timeout, env=full, **kw)
        return self.host.run(*args, check=check, timeout=timeout, env=full, **kw)

    def nmcli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = self.run_in_host("nmcli", *args, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise NMLabError(self._failure(f"nmcli {' '.join(args)} failed ({proc.returncode}): "
                                           f"{proc.stderr.strip()}"))
        return proc

    def log_tail(self, path: Optional[str] = None, lines: int = 40) -> str:
        path = path or self.nm_log
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return f"({path} not readable)"

    def _failure(self, message: str, path: Optional[str] = None) -> str:
        path = path or self.nm_log
        return f"{message}\n--- last lines of {path} ---\n{self.log_tail(path)}"

    # ---- start and stop ---------------------------------------------------

    def start(self) -> "NMLab":
        """Start the bus, then NetworkManager (with its dispatcher); manage eth0 and eth1."""
        self._prepare_dirs()
        self._start_bus()
        self._start_nm()
        return self

    def _prepare_dirs(self) -> None:
        os.makedirs(self.base, exist_ok=True)
        for path in (self.keyfile_dir, self.run_dir, self.lib_dir, self._path("conf.d")):
            os.makedirs(path, mode=0o700, exist_ok=True)
        for path in (self.bus_dir, *self.binds.values()):
            os.makedirs(path, mode=0o755, exist_ok=True)
        for sub in ("", "pre-up.d", "pre-down.d", "no-wait.d"):
            path = os.path.join(self.dispatcher_dir, sub)
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o755)
        os.chmod(self.base, 0o755)
        self._write(self._path("dbus.conf"), DBUS_CONFIG.format(socket=self.bus_socket))
        self._write(self._path("NetworkManager.conf"), NM_CONFIG.format(keyfiles=self.keyfile_dir))
        q = shlex.quote
        extra_binds = "".join(f"mkdir -p {q(target)}\nmount --bind {q(source)} {q(target)}\n"
                              for target, source in self.binds.items())
        script = START_SCRIPT.format(
            bus_dir=q(self.bus_dir), extra_binds=extra_binds, run_dir=q(self.run_dir), lib_dir=q(self.lib_dir), dispatcher_dir=q(self.dispatcher_dir),
            dispatcher=self._dispatcher_bin(), dispatcher_log=q(self.dispatcher_log),
            dispatcher_pid=q(self._path("dispatcher.pid")), dispatcher_name=DISPATCHER_NAME,
            nm=NM_BIN, config=q(self._path("NetworkManager.conf")), conf_d=q(self._path("conf.d")),
            state_file=q(os.path.join(self.lib_dir, "NetworkManager.state")))
        self._write(self._path("start-nm.sh"), script, mode=0o755)
        if self.root:
            self._prepare_root()

    def _dispatcher_bin(self) -> str:
        for path in DISPATCHER_BINS:
            if os.path.isfile((self.root or "") + path):
                return path
        raise NMLabError(f"no nm-dispatcher in {self.root or '/'} (looked for {', '.join(DISPATCHER_BINS)})")

    def _prepare_root(self) -> None:
        """The script that enters the root; mountpoints for the base directory and bind sources
        (those created here are removed by :meth:`stop`)."""
        q = shlex.quote
        sources = [self.base] + [s for s in self.binds.values() if not s.startswith(self.base + "/")]
        binds = ""
        for source in dict.fromkeys(sources):
            self._make_root_mountpoint(source)
            binds += f"mount --bind {q(source)} {q(self.root + source)}\n"
        script = ENTER_ROOT_SCRIPT.format(binds=binds, root=q(self.root), start=q(self._path("start-nm.sh")))
        self._write(self._path("enter-root.sh"), script, mode=0o755)

    def _make_root_mountpoint(self, path: str) -> None:
        missing = []
        while not os.path.exists(self.root + path):
            missing.append(self.root + path)
            path = os.path.dirname(path)
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            self._root_mountpoints.append(directory)
        target = self.root + path
        if os.path.realpath(target) != target:  # a symlink in the root would lead the bind mount astray
            raise NMLabError(f"{target} is (under) a symlink: choose a base directory outside it")

    def _remove_root_mountpoints(self) -> None:
        """The empty directories made in the root for bind mounts (the mounts died with NetworkManager)."""
        for directory in reversed(self._root_mountpoints):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        self._root_mountpoints.clear()

    @staticmethod
    def _write(path: str, text: str, mode: int = 0o644) -> None:
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)

    def _spawn(self, args: List[str], log: str) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True)

    def _start_bus(self) -> None:
        if self._bus is not None:
            return
        if os.path.exists(self.bus_socket):
            os.unlink(self.bus_socket)
        self._bus = self._spawn(["ip", "netns", "exec", self.host.name, "dbus-daemon", "--nofork",
                                 "--nosyslog", f"--config-file={self._path('dbus.conf')}"], self.dbus_log)
        if not wait_for(lambda: self._bus_answers() or self._bus.poll() is not None, timeout=10) \
                or self._bus.poll() is not None:
            raise NMLabError(self._failure("dbus-daemon did not start", self.dbus_log))

    def _bus_answers(self) -> bool:
        proc = run(["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                    "/org/freedesktop/DBus", "org.freedesktop.DBus.ListNames"], check=False, env=self.env())
        return proc.returncode == 0

    def _start_nm(self, timeout: float = 30) -> None:
        """Start NetworkManager and its dispatcher; return once both eth0 and eth1 are managed."""
        pid_file = self._path("dispatcher.pid")
        if os.path.exists(pid_file):
            os.unlink(pid_file)
        script = self._path("enter-root.sh" if self.root else "start-nm.sh")
        args = ["ip", "netns", "exec", self.host.name, "unshare", "-m", "--propagation", "private", script]
        self._nm = self._spawn(args, self.nm_log)  # ip netns exec, unshare, sh (and chroot) all exec: one PID
        self._dispatcher_pid = wait_for(lambda: self._read_pid(pid_file) or self._nm_died(), timeout=10) or None
        self._wait_nm_running(timeout)
        if self.root:
            self._check_root()
        for dev in self.DEVICES:
            self._manage(dev, timeout)

    def _check_root(self) -> None:
        """NetworkManager's PID (the one nsenter uses) is the process that runs in the root."""
        try:
            root, exe = os.readlink(f"/proc/{self.nm_pid}/root"), os.readlink(f"/proc/{self.nm_pid}/exe")
        except OSError as exc:
            self._nm_died()
            raise NMLabError(self._failure(f"cannot inspect NetworkManager's process: {exc}")) from None
        if root != self.root or exe != self.root + NM_BIN:
            raise NMLabError(self._failure(f"process {self.nm_pid} runs {exe} in {root}, "
                                           f"not {NM_BIN} in {self.root}"))

    @staticmethod
    def _read_pid(path: str) -> Optional[int]:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _nm_died(self) -> bool:
        if self._nm is not None and self._nm.poll() is not None:
            raise NMLabError(self._failure(f"NetworkManager exited ({self._nm.returncode})"))
        return False

    def _wait_nm_running(self, timeout: float) -> None:
        def running() -> bool:
            self._nm_died()
            proc = self.nmcli("-t", "-f", "RUNNING", "general", check=False)
            return proc.returncode == 0 and proc.stdout.strip() == "running"

        if not wait_for(running, timeout=timeout, interval=0.1):
            raise NMLabError(self._failure(f"NetworkManager did not answer within {timeout} s"))

    def device_state(self, dev: str) -> Optional[str]:
        """nmcli's state of a device (e.g. 'unmanaged', 'disconnected', 'connected'), None if unknown."""
        out = self.nmcli("-t", "-f", "DEVICE,STATE", "device", check=False).stdout
        states = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return states.get(dev)

    def _manage(self, dev: str, timeout: float) -> None:
        if not wait_for(lambda: self.device_state(dev) is not None, timeout=timeout, interval=0.1):
            raise NMLabError(self._failure(f"NetworkManager does not see {dev}"))
        self.nmcli("device", "set", dev, "managed", "yes")
        if not wait_for(lambda: self.device_state(dev) not in (None, "unmanaged", "unavailable"),
                        timeout=timeout, interval=0.1):
            raise NMLabError(self._failure(f"{dev} stays {self.device_state(dev)}"))

    def restart_nm(self, timeout: float = 30) -> None:
        """Stop NetworkManager (SIGTERM) and its dispatcher, then start both again.

        Devices stay configured: NetworkManager leaves them as they are on SIGTERM and,
        from its private /run/NetworkManager, takes them over again on start."""
        self._stop_nm()
        self._start_nm(timeout)

    def _stop_nm(self) -> None:
        if self._nm is not None:
            _end_child(self._nm)
            self._nm = None
        pid = self._dispatcher_pid or self._read_pid(self._path("dispatcher.pid"))  # also after a failed start
        if pid is not None:
            _end_pid(pid, "nm-dispatcher")
        self._dispatcher_pid = None

    def kill_bus(self) -> None:
        """SIGKILL the lab's dbus-daemon: the bus dies under every client (NetworkManager too)."""
        if self._bus is not None:
            self._bus.kill()
            self._bus.wait(10)
            self._bus = None

    def freeze_bus(self, frozen: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the lab's dbus-daemon: a bus that hangs, connections stay open."""
        if self._bus is not None:
            self._bus.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def restart_bus_and_nm(self, timeout: float = 30) -> None:
        """After :meth:`kill_bus`: a new bus, then NetworkManager and its dispatcher again on it
        (NetworkManager takes its devices over as they are, as after a restart)."""
        self._stop_nm()
        self._start_bus()
        self._start_nm(timeout)

    def stop(self) -> None:
        """End everything this lab started, by PID. Safe to call more than once."""
        self.freeze_bus(False)
        self.stop_dhcp_server()
        self._stop_nm()
        if self._bus is not None:
            _end_child(self._bus)
            self._bus = None
        self._remove_root_mountpoints()

    def __enter__(self) -> "NMLab":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- profiles ---------------------------------------------------------

    def write_keyfile(self, name: str, text: str) -> str:
        """Write ``<keyfile dir>/<name>.nmconnection`` (0600) and reload; check NM loaded it."""
        path = os.path.join(self.keyfile_dir, f"{name}.nmconnection")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        self.nmcli("connection", "reload")
        match = re.search(r"^uuid=(\S+)\s*$", text, re.M)
        if match and self.nmcli("connection", "show", "uuid", match.group(1), check=False).returncode != 0:
            why = [line for line in self.log_tail(lines=200).splitlines() if path in line]
            raise NMLabError(self._failure(f"NetworkManager did not load {path}: {why[-1:] or 'see the log'}"))
        return path

    def seed_keyfiles(self, user_service: Optional[Mapping[str, str]] = None,
                      user_mgmt: Optional[Mapping[str, str]] = None) -> None:
        """Profiles 'mgmt' (eth0) and 'service' (eth1) matching the seed; not activated."""
        self.write_keyfile("mgmt", mgmt_keyfile(user_mgmt))
        self.write_keyfile("service", service_keyfile(user_service))

    def dhcp_keyfile(self, name: str = "dhcp", user: Optional[Mapping[str, str]] = None) -> None:
        """A profile on eth1 (UUID DHCP_UUID): IPv4 from DHCP, IPv6 static as in 'service'."""
        self.write_keyfile(name, dhcp_keyfile(name, user))

    def up(self, name_or_uuid: str, timeout: int = 30) -> None:
        self._connection("up", name_or_uuid, timeout)

    def down(self, name_or_uuid: str, timeout: int = 30) -> None:
        self._connection("down", name_or_uuid, timeout)

    def _connection(self, verb: str, name_or_uuid: str, timeout: int) -> None:
        kind = "uuid" if UUID_RE.match(name_or_uuid) else "id"
        proc = self.nmcli("--wait", str(timeout), "connection", verb, kind, name_or_uuid, check=False,
                          timeout=timeout + 15)
        if proc.returncode != 0:
            raise NMLabError(self._failure(f"nmcli connection {verb} {name_or_uuid} failed "
                                           f"({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"))

    # ---- DHCP -------------------------------------------------------------

    def start_dhcp_server(self, range_start: str = "10.0.1.100", range_end: str = "10.0.1.150",
                          lease_seconds: int = 120) -> None:
        """dnsmasq in the router namespace on r-svc, serving 10.0.1.0/24 with router 10.0.1.1.

        Authoritative (it NAKs a request for an address it does not hand out) and without
        the ping check. dnsmasq raises leases shorter than 120 s to 120 s."""
        if self._dnsmasq is not None:
            raise NMLabError("the DHCP server is already running")
        if os.path.exists(self._path("dnsmasq.pid")):
            os.unlink(self._path("dnsmasq.pid"))
        args = ["ip", "netns", "exec", self.seed.rtr.name, DNSMASQ_BIN, "--keep-in-foreground",
                "--conf-file=/dev/null", "--port=0", "--interface=r-svc", "--bind-interfaces",
                f"--dhcp-range={range_start},{range_end},255.255.255.0,{int(lease_seconds)}",
                "--dhcp-option=option:router,10.0.1.1", "--dhcp-authoritative", "--no-ping",
                f"--dhcp-leasefile={self.dhcp_lease_file}", f"--pid-file={self._path('dnsmasq.pid')}",
                "--log-dhcp", f"--log-facility={self.dnsmasq_log}", "--user=root", "--group=root"]
        self._dnsmasq = self._spawn(args, self._path("dnsmasq.out"))
        if not wait_for(lambda: os.path.exists(self._path("dnsmasq.pid")) or self._dnsmasq.poll() is not None,
                        timeout=10) or self._dnsmasq.poll() is not None:
            raise NMLabError(self._failure("dnsmasq did not start", self._path("dnsmasq.out")))

    def stop_dhcp_server(self) -> None:
        if self._dnsmasq is not None:
            _end_child(self._dnsmasq)
            self._dnsmasq = None

    def renumber_dhcp(self, range_start: str, range_end: str, reactivate: bool = False,
                      name_or_uuid: str = DHCP_UUID, lease_seconds: int = 120, timeout: float = 15) -> str:
        """Force the active DHCP profile on eth1 to a new address from a new range; return it.

        dnsmasq is restarted without its lease file and with the new range (authoritative, so
        it NAKs the client's request for its old address and the client falls back to a
        DISCOVER). Then, measured on NetworkManager 1.42:

        - ``reactivate=False`` (in place): ``nmcli device modify eth1 ipv4.dhcp-timeout N``
          with a new N restarts the DHCP client on the applied connection: the address
          changes well within a second and the dispatcher sees ``reapply`` then
          ``dhcp4-change``, with no ``down``/``up``. (A plain ``nmcli device reapply``
          without a change does not restart DHCP: the address stays.)
        - ``reactivate=True``: ``nmcli connection up`` again: the dispatcher sees
          ``pre-down``, ``down``, ``dhcp4-change``, ``pre-up``, ``up``.

        Waiting for the lease to expire is no option: dnsmasq's shortest lease is 120 s."""
        self.stop_dhcp_server()
        if os.path.exists(self.dhcp_lease_file):
            os.unlink(self.dhcp_lease_file)
        self.start_dhcp_server(range_start, range_end, lease_seconds)
        if reactivate:
            self.up(name_or_uuid)
        else:
            self._dhcp_restarts += 1
            self.nmcli("device", "modify", "eth1", "ipv4.dhcp-timeout", str(20 + self._dhcp_restarts))

        def new_address() -> Optional[str]:
            addrs = [a["local"] for link in self.host.ipj("-4", "addr", "show", "dev", "eth1")
                     for a in link["addr_info"]]
            return addrs[0] if len(addrs) == 1 and _in_range(addrs[0], range_start, range_end) else None

        address = wait_for(new_address, timeout=timeout)
        if not address:
            raise NMLabError(self._failure(f"eth1 got no address in {range_start}-{range_end}"))
        return address


def _in_range(address: str, start: str, end: str) -> bool:
    return ipaddress.ip_address(start) <= ipaddress.ip_address(address) <= ipaddress.ip_address(end)


# ---- keyfiles ---------------------------------------------------------------

def _user_group(user: Optional[Mapping[str, str]]) -> str:
    if not user:
        return ""
    return "\n[user]\n" + "".join(f"{key}={value}\n" for key, value in user.items())


def _connection_group(name: str, uuid: str, iface: str) -> str:
    return (f"[connection]\nid={name}\nuuid={uuid}\ntype=ethernet\ninterface-name={iface}\n"
            "autoconnect=false\n\n[ethernet]\n")


def mgmt_keyfile(user: Optional[Mapping[str, str]] = None) -> str:
    """eth0: addresses and the route to the monitoring subnet, no gateway, never default."""
    return (_connection_group("mgmt", MGMT_UUID, "eth0")
            + "\n[ipv4]\nmethod=manual\naddress1=10.0.0.2/24\nroute1=10.0.9.0/24,10.0.0.1\n"
            "never-default=true\ndad-timeout=0\n"
            "\n[ipv6]\nmethod=manual\naddr-gen-mode=eui64\naddress1=fd00:0::2/64\n"
            "route1=fd00:9::/64,fd00:0::1\nnever-default=true\n"
            + _user_group(user))


def service_keyfile(user: Optional[Mapping[str, str]] = None) -> str:
    """eth1: addresses and the default routes."""
    return (_connection_group("service", SERVICE_UUID, "eth1")
            + "\n[ipv4]\nmethod=manual\naddress1=10.0.1.2/24\ngateway=10.0.1.1\ndad-timeout=0\n"
            + _ipv6_service() + _user_group(user))


def dhcp_keyfile(name: str = "dhcp", user: Optional[Mapping[str, str]] = None) -> str:
    """eth1: IPv4 by DHCP (activation waits for the lease), IPv6 as in 'service'."""
    return (_connection_group(name, DHCP_UUID, "eth1")
            + "\n[ipv4]\nmethod=auto\nmay-fail=false\ndhcp-timeout=20\ndad-timeout=0\n"
            + _ipv6_service() + _user_group(user))


def _ipv6_service() -> str:
    return "\n[ipv6]\nmethod=manual\naddr-gen-mode=eui64\naddress1=fd00:1::2/64\ngateway=fd00:1::1\n"


# ---- ending processes by PID ------------------------------------------------

def _end_child(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _end_pid(pid: int, expect: str, timeout: float = 10) -> None:
    """End a process that is not our child (the dispatcher), checking first that it is ``expect``."""
    if not _is_alive(pid, expect):
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_for(lambda: not _is_alive(pid, expect), timeout=timeout):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _is_alive(pid, expect), timeout=5)


def _is_alive(pid: int, expect: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return expect.encode() in cmdline and state not in ("Z", "X")
