"""A Debian 13 (trixie) tree used as a chroot: created once by debootstrap, kept as a cache.

Its job: give ``./run deb-test`` a Debian 13 system in which the nm-policy-routing
package is built, checked by lintian, installed and removed, without touching this
machine's own packages or network.

- Every command runs as ``unshare -m --propagation private`` + ``chroot``: /proc, /dev
  (a bind mount), /sys (read-only) and a tmpfs on /run are mounted in a private mount
  namespace and vanish with it.
- Maintainer scripts never run in the root network namespace: packages are downloaded
  first (the only step with network access, it changes nothing in the kernel), then
  installed inside ``unshare -n``, a network namespace of their own that dies with them.
- ``/usr/sbin/policy-rc.d`` (exit 101) in the tree keeps every service from starting.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence

TREE = os.environ.get("NPR_TRIXIE_TREE", "/var/tmp/npr-trixie")
SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_CACHE = "/var/tmp/npr-debootstrap-cache"
BACKGROUND_LOG = "/tmp/debootstrap.log"  # a debootstrap started by hand may be writing the tree
PACKAGES = ("build-essential", "debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all",
            "python3-setuptools", "fakeroot", "dpkg-dev", "lintian", "network-manager", "nftables", "python3-nftables",
            "python3-pyroute2", "python3-pydantic", "python3-dbus-next", "iproute2", "iputils-ping",
            "dbus", "util-linux", "openvpn", "network-manager-openvpn")
PACKAGE = "nm-policy-routing"
BUILD_DIR = "/build"  # inside the tree
POLICY_RC_D = "#!/bin/sh\n# nm-policy-routing's deb-test: no service starts in this tree\nexit 101\n"
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
              "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "TERM": "dumb"}

# $1 = the tree; the rest: the command to run in it. Runs in a private mount namespace.
ENTER = """set -eu
root=$1; shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t sysfs -o ro sysfs "$root/sys"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
exec chroot "$root" "$@"
"""

#: where a command in the tree runs: its own empty network namespace, or the root one
#: (only to download packages)
ISOLATED, ROOT_NETNS = "isolated", "root"


class TreeError(RuntimeError):
    """A step in the tree failed; the message names the step and carries the output's tail."""


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Tree:
    """The Debian tree at ``path``; ``log_dir`` receives the full output of long steps."""

    def __init__(self, path: str = TREE, log_dir: Optional[str] = None) -> None:
        self.path = os.path.realpath(path)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="npr-tree-")
        os.makedirs(self.log_dir, exist_ok=True)

    def inside(self, path: str) -> str:
        """The host path of ``path`` in the tree."""
        return os.path.join(self.path, path.lstrip("/"))

    # ---- running commands ----------------------------------------------------

    def run(self, *args: str, network: str = ISOLATED, log: Optional[str] = None, check: bool = True,
            timeout: float = 1800, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run ``args`` in the tree; ``log``: also write the output to LOG_DIR/log."""
        flags = ["-m", "--propagation", "private"] + (["-n"] if network == ISOLATED else [])
        command = ["unshare", *flags, "sh", "-c", ENTER, "enter", self.path, *args]
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env={**CHROOT_ENV, **(env or {})})
        output = proc.stdout + proc.stderr
        if log:
            with open(os.path.join(self.log_dir, log), "a") as handle:
                handle.write(f"$ {' '.join(args)}\n{output}\n(exit {proc.returncode})\n")
        if check and proc.returncode != 0:
            where = f" (full output: {os.path.join(self.log_dir, log)})" if log else ""
            raise TreeError(f"in {self.path}: {' '.join(args)} failed ({proc.returncode}){where}:\n"
                            f"{tail(output)}")
        return proc

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("/bin/sh", "-c", script, **kw)

    # ---- the tree itself -------------------------------------------------------

    def complete(self) -> bool:
        """debootstrap finished: apt is there and its work directory /debootstrap is gone."""
        return os.path.isfile(self.inside("/usr/bin/apt-get")) and not os.path.exists(self.inside("/debootstrap"))

    def ensure(self) -> str:
        """Wait for a debootstrap of this tree already running, create the tree if it is missing.

        Returns what happened, for the step's heading."""
        waited = self._wait_for_running_debootstrap()
        if self.complete():
            return f"{self.path} is there" + (f" (waited {waited:.0f} s for its debootstrap)" if waited else "")
        if os.path.exists(self.path):
            self._remove_incomplete()
        self._debootstrap()
        return f"{self.path} created by debootstrap"

    def _debootstrap_pids(self) -> List[int]:
        """PIDs of running debootstraps whose arguments name this tree (read from /proc)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(os.path.basename(a) == "debootstrap" for a in argv[:2]) and \
                    any(a.rstrip("/") == self.path for a in argv):
                pids.append(int(entry))
        return pids

    def _wait_for_running_debootstrap(self, timeout: float = 3600) -> float:
        started = time.monotonic()
        announced = False
        while self._debootstrap_pids():
            if not announced:
                print(f"  a debootstrap of {self.path} is running (pids {self._debootstrap_pids()}, "
                      f"log {BACKGROUND_LOG}): waiting for it", flush=True)
                announced = True
            if time.monotonic() - started > timeout:
                raise TreeError(f"the debootstrap of {self.path} still runs after {timeout:.0f} s")
            time.sleep(2)
        return time.monotonic() - started if announced else 0.0

    def _remove_incomplete(self) -> None:
        with open("/proc/self/mountinfo") as handle:
            mounted = [line.split()[4] for line in handle if line.split()[4].startswith(self.path + "/")]
        if mounted:
            raise TreeError(f"{self.path} is incomplete but has mounts inside ({mounted[:3]}); "
                            "unmount them, then run again")
        print(f"  {self.path} is incomplete (an interrupted debootstrap?): removing it", flush=True)
        subprocess.run(["rm", "-rf", "--one-file-system", self.path], check=True)

    def _debootstrap(self) -> None:
        if shutil.which("debootstrap") is None:
            print("  installing debootstrap on this machine (apt-get)", flush=True)
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"],
                           check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        os.makedirs(DEBOOTSTRAP_CACHE, exist_ok=True)
        log = os.path.join(self.log_dir, "debootstrap.log")
        print(f"  debootstrap {SUITE} into {self.path} (a few minutes; log {log})", flush=True)
        with open(log, "w") as handle:  # its mounts in the tree (/proc, /sys) stay private, even if it is killed
            proc = subprocess.run(["unshare", "-m", "--propagation", "private",
                                   "debootstrap", "--variant=minbase", f"--cache-dir={DEBOOTSTRAP_CACHE}",
                                   "--include=ca-certificates", SUITE, self.path, MIRROR],
                                  stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not self.complete():
            with open(log) as handle:
                raise TreeError(f"debootstrap failed ({proc.returncode}):\n{tail(handle.read())}")

    # ---- packages ---------------------------------------------------------------

    def prepare(self) -> str:
        """policy-rc.d, then the packages the build and the lab need (only those missing)."""
        self._write_policy_rc_d()
        missing = [p for p in PACKAGES if not self.installed(p)]
        if not missing:
            return "every package needed is installed"
        print(f"  installing into the tree: {' '.join(missing)}", flush=True)
        self.run("apt-get", "update", network=ROOT_NETNS, log="apt.log")
        self.install(missing)
        return f"installed {len(missing)} packages (and their dependencies)"

    def _write_policy_rc_d(self) -> None:
        path = self.inside("/usr/sbin/policy-rc.d")
        with open(path, "w") as handle:
            handle.write(POLICY_RC_D)
        os.chmod(path, 0o755)

    def installed(self, package: str) -> bool:
        """dpkg's state is 'install ok installed' (a removed package keeping its conffiles is not)."""
        proc = self.run("dpkg-query", "-W", "-f=${Status}", package, check=False)
        return proc.returncode == 0 and proc.stdout.strip() == "install ok installed"

    def known(self, package: str) -> bool:
        """dpkg knows the package at all (installed, or removed with its conffiles left)."""
        proc = self.run("dpkg-query", "-W", "-f=${Status}", package, check=False)
        return proc.returncode == 0 and "not-installed" not in proc.stdout

    def install(self, packages: Sequence[str], cwd: str = "/") -> None:
        """Download with network access, then install (maintainer scripts) in an isolated netns,
        where apt cannot reach the network (apt 3.0's --no-download fails on a local .deb)."""
        args = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
        script = 'cd "$1"; shift; exec "$@"'
        self.run("sh", "-c", script, "install", cwd, *args, "--download-only", network=ROOT_NETNS, log="apt.log")
        self.run("sh", "-c", script, "install", cwd, *args, log="apt.log")

    def purge(self, package: str = PACKAGE) -> None:
        """``dpkg --purge`` in an isolated network namespace (a prerm flush acts there)."""
        self.run("dpkg", "--purge", package, log="apt.log")

    # ---- the package --------------------------------------------------------------

    def build(self, tar_stream: bytes) -> str:
        """Unpack the source (a tar with ``nm-policy-routing/`` at its top), add ``debian/`` from
        ``packaging/debian``, run ``dpkg-buildpackage -us -uc -b``; return the .deb's path in the tree."""
        build = self.inside(BUILD_DIR)
        if os.path.exists(build):
            subprocess.run(["rm", "-rf", "--one-file-system", build], check=True)
        os.makedirs(build)
        subprocess.run(["tar", "-x", "-C", build], input=tar_stream, check=True)
        source = os.path.join(build, PACKAGE)
        shutil.copytree(os.path.join(source, "packaging", "debian"), os.path.join(source, "debian"))
        self.sh(f"cd {BUILD_DIR}/{PACKAGE} && dpkg-buildpackage -us -uc -b", log="build.log")
        debs = glob.glob(os.path.join(build, f"{PACKAGE}_*_all.deb"))
        if len(debs) != 1:
            raise TreeError(f"dpkg-buildpackage made {len(debs)} .deb files in {build}: {debs}")
        return os.path.join(BUILD_DIR, os.path.basename(debs[0]))

    def lintian(self, deb: str) -> subprocess.CompletedProcess:
        """lintian on the .deb, as user nobody; the caller reads the tags."""
        return self.run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--reset-env",
                        "lintian", "--no-cfg", "--display-info", "--fail-on", "error", deb,
                        check=False, log="lintian.log", env={"HOME": "/tmp"})
