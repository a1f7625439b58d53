"""``./run machine-test``: the package on a booted Debian 13 machine, as a user meets it.

systemd is PID 1 (tests/lab/machine.py), with NetworkManager 1.52, polkitd and the
package's hardened service; a monitoring host and a router are network namespaces
linked to the machine's eth0/eth1 by veth pairs. Steps: install the previous version
and set the seed policy; upgrade to this one with the connection up while a watcher in
the machine samples the rule every few ms; the seed lifecycle with the installed CLI and
the service (replies by eth1, counted); restart, stop/start; an unprivileged user
refused, then allowed by a polkit rule; the journal filtered by the connection; a
reboot; a reboot where the service starts after NetworkManager activated the
connections; purge. Prints PASS/FAIL per check and the wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import traceback
from typing import List, Optional

from tests.lab.machine import MACHINE_TREE, Machine, ensure_tree
from tests.lab.machinesteps import Checks, builds, root_netns, steps
from tests.lab.netns import Lab, Seed, run

LOG_DIR = "/var/tmp/npr-machine-test"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="./run machine-test", description=(
        "The package on a booted Debian 13 machine: upgrade, lifecycle, restart, polkit, journal, reboots, "
        f"purge. The tree: $NPR_MACHINE_TREE (now {MACHINE_TREE}); logs: {LOG_DIR}."))
    parser.add_argument("--previous", metavar="COMMIT", help="upgrade from the package built from COMMIT "
                        "(default: the newest commit whose changelog has the version before HEAD's)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    os.makedirs(LOG_DIR)
    print(f"logs of this run: {LOG_DIR}")
    checks = Checks(started)
    before = root_netns()
    ok = True
    try:
        checks.step("1. The machine's tree (a copy of the deb-test tree + systemd, polkitd, NetworkManager)")
        tree = ensure_tree(LOG_DIR)
        checks.step("2. Building the previous and this version of the package")
        debs = builds(tree, LOG_DIR, args.previous)
        with Lab() as lab:
            seed = Seed.build(lab, host_links=False)
            machine = Machine(tree, seed, LOG_DIR)
            try:
                steps(machine, seed, debs, checks)
            finally:
                checks.step("Powering off, cleaning up")
                machine.close()
                checks.check("the machine is powered off, its cgroup removed",
                              machine.proc is None and not os.path.exists(machine.cgroup))
        checks.check("the lab's namespaces are removed",
                     not [n for n in run(["ip", "netns", "list"]).stdout.split() if n.startswith(lab.prefix)])
    except Exception as exc:  # a failed step: report it, still clean up (above) and give the verdict
        if not isinstance(exc, (RuntimeError, subprocess.SubprocessError)):
            traceback.print_exc()
        print(f"\nFAILED: {exc}", flush=True)
        ok = False
    checks.check("the root network namespace is untouched", root_netns() == before)
    ok = checks.report() and ok
    print(f"\n{'PASS' if ok else 'FAIL'}: ./run machine-test (wall time {time.monotonic() - started:.0f} s)",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
