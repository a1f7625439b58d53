"""``./run deb-test``: the Debian package, built, linted, installed and used on Debian 13.

Its job: prove that the .deb built from ``packaging/debian`` works on Debian 13 (trixie)
with Debian's own NetworkManager (1.52), python3 and libraries, not this project's venv:

1. a trixie tree (tests/lab/trixie.py) with the build tools, lintian and the runtime
   packages; created by debootstrap the first time, kept as a cache;
2. ``dpkg-buildpackage -us -uc -b`` on a clean copy of the repository (``git archive
   HEAD``; ``--worktree``: the working tree's files) with ``packaging/debian`` as
   ``debian/``, then lintian (an error fails the run) and ``apt-get install ./….deb``;
3. the seed scenario in a lab (tests/lab/netns.py) with the tree's NetworkManager in
   a chroot (NMLab with ``root``): the policy set with the installed CLI, applied and
   removed by the installed dispatcher hook, replies fixed; an OpenVPN connection with its
   own policy beside it (tests/lab/debtest_vpn.py); then ``apt-get remove`` with
   the connection up: its prerm flush must leave the host namespace clean.

The tree is kept; the package is purged at the end. Nothing runs in this machine's
network namespace but the package downloads: maintainer scripts run in a network
namespace of their own or in the lab's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

from tests.lab.demo import say, show, verdict
from tests.lab.netns import ROOT, Lab, Seed, run, wait_for
from tests.lab.nm import NMLab
from tests.lab.debtest_vpn import vpn_step
from tests.lab.trixie import BUILD_DIR, PACKAGE, TREE, Tree
from tests.lab.world import PROTO

LOG_DIR = "/var/tmp/npr-deb-test"  # the last run's logs (build, lintian, apt, NetworkManager)
HOOK = "/usr/lib/NetworkManager/dispatcher.d/50-nm-policy-routing"
POLICY = ("enable", "yes", "table", "100", "fwmark", "0x1", "priority", "1000")


class Failed(Exception):
    """A step failed; the run stops there (the message says why)."""


# ---- the source -----------------------------------------------------------------


def source_tar(repo: str, worktree: bool) -> bytes:
    """The repository as a tar with ``nm-policy-routing/`` at its top: HEAD, or the working tree's
    tracked and not-ignored files (read as they are; nothing is written into .git)."""
    git = ["git", "-c", f"safe.directory={repo}", "-C", repo]
    if not worktree:
        return subprocess.run([*git, "archive", f"--prefix={PACKAGE}/", "HEAD"], capture_output=True,
                              check=True).stdout
    listed = subprocess.run([*git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    files = b"\0".join(f for f in listed if f and os.path.lexists(os.path.join(repo.encode(), f)))
    return subprocess.run(["tar", "-c", "-C", repo, "--null", "-T", "-", "--transform", f"s,^,{PACKAGE}/,SH"],
                          input=files, capture_output=True, check=True).stdout


def describe(repo: str, worktree: bool) -> str:
    git = ["git", "-c", f"safe.directory={repo}", "-C", repo]
    head = run([*git, "log", "-1", "--format=%h %s"]).stdout.strip()
    dirty = run([*git, "status", "--porcelain"]).stdout.strip()
    if worktree:
        return f"the working tree (HEAD {head}{', with changes' if dirty else ''})"
    note = "; the working tree has changes that are NOT in this build (--worktree builds them)" if dirty else ""
    return f"HEAD {head}{note}"


# ---- the package steps ----------------------------------------------------------


def prepare_tree(tree: Tree) -> None:
    print(f"  {tree.ensure()}")
    print(f"  {tree.prepare()}")
    if tree.known(PACKAGE):
        print(f"  a previous run left {PACKAGE} in the tree: purging it (in a network namespace of its own)")
        tree.purge()


def build(tree: Tree, repo: str, worktree: bool) -> str:
    print(f"  source: {describe(repo, worktree)}")
    deb = tree.build(source_tar(repo, worktree))
    size = os.path.getsize(tree.inside(deb))
    print(f"  built {deb} ({size // 1024} KiB) in the tree; log {tree.log_dir}/build.log")
    show(f"$ dpkg-deb -f {deb} Depends", tree.run("dpkg-deb", "-f", deb, "Depends").stdout)
    return deb


def lint(tree: Tree, deb: str) -> List[str]:
    """Print lintian's tags; raise Failed on an error (or if lintian itself failed)."""
    proc = tree.lintian(deb)
    tags = [line for line in proc.stdout.splitlines() if line.strip()]
    version = tree.run("lintian", "--version").stdout.strip()
    show(f"$ lintian --display-info {os.path.basename(deb)}   ({version})", "\n".join(tags) or "(no tags)")
    errors = [t for t in tags if t.startswith("E:")]
    if errors:
        raise Failed(f"lintian reports {len(errors)} error(s)")
    if proc.returncode != 0:
        raise Failed(f"lintian failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    print(f"  lintian: no errors, {sum(t.startswith('W:') for t in tags)} warning(s)")
    return tags


def install(tree: Tree, deb: str) -> None:
    tree.install([f"./{os.path.basename(deb)}"], cwd=BUILD_DIR)
    version = tree.run("dpkg-query", "-W", "-f=${Version}", PACKAGE).stdout
    print(f"  {PACKAGE} {version} installed in the tree (maintainer scripts in a network namespace of their own)")


# ---- what the kernel holds in the lab's host namespace ----------------------------


def ours(nm: NMLab) -> Dict[str, Any]:
    """Every rule and route tagged with our protocol, our nft table, eth1's src_valid_mark.

    The tree's nft looks for the table: this machine's older nft may fail to list it."""
    host = nm.host
    rules = [r for family in ("-4", "-6") for r in host.ipj(family, "rule") if str(r.get("protocol")) in PROTO]
    routes = [r for family in ("-4", "-6") for r in host.ipj(family, "route", "show", "table", "all")
              if str(r.get("protocol")) in PROTO]
    nft = nm.run_in_host("nft", "list", "table", "inet", "nm_policy_routing", check=False).returncode == 0
    return {"rules": rules, "routes": routes, "nft": nft, "svm": host.conf("ipv4", "eth1", "src_valid_mark")}


def applied(state: Dict[str, Any]) -> bool:
    """The seed policy: rule 1000 fwmark 0x1 -> table 100, table 100's default via eth1, nft, svm 1."""
    rule = any(r.get("priority") == 1000 and r.get("fwmark") == "0x1" and str(r.get("table")) == "100"
               for r in state["rules"])
    route = any(r.get("dst") == "default" and str(r.get("table")) == "100" and r.get("dev") == "eth1"
                and r.get("gateway") == "10.0.1.1" for r in state["routes"])
    return rule and route and state["nft"] and state["svm"] == 1


def clean(state: Dict[str, Any], svm_before: int) -> bool:
    return not state["rules"] and not state["routes"] and not state["nft"] and state["svm"] == svm_before


def installed_view(nm: NMLab) -> str:
    host = nm.host
    rules = "\n".join(f"{family[1:]}: {line}" for family in ("-4", "-6")
                      for line in host.run("ip", family, "rule").stdout.splitlines() if "proto 214" in line)
    table = host.run("ip", "route", "show", "table", "100", check=False).stdout.strip()
    state = ours(nm)
    return (f"ip rule (proto 214):\n{rules or '(none)'}\nip route show table 100:\n{table or '(none)'}\n"
            f"nft table inet nm_policy_routing: {'present' if state['nft'] else 'absent'}\n"
            f"net.ipv4.conf.eth1.src_valid_mark = {state['svm']}")


# ---- the seed scenario with the tree's NetworkManager ------------------------------


def cli(nm: NMLab, *args: str) -> subprocess.CompletedProcess:
    """The installed nm-policy-routing, run in NetworkManager's namespaces and root."""
    return nm.run_in_host(PACKAGE, *args, check=False)


def probe(seed: Seed, expect: bool) -> bool:
    word = "works" if expect else "fails"
    results = [
        verdict(f"ping   monitoring host -> {Seed.SERVICE4} {word}", seed.ping(Seed.SERVICE4) == expect),
        verdict(f"TCP    monitoring host -> {Seed.SERVICE4}:8021 {word}", seed.tcp(Seed.SERVICE4) == expect),
    ]
    if expect:
        results.append(verdict(f"TCP    monitoring host -> [{Seed.SERVICE6}]:8021 works", seed.tcp(Seed.SERVICE6)))
    return all(results)


def scenario(tree: Tree) -> bool:
    with Lab() as lab:
        seed = Seed.build(lab, address_host=False)
        base = os.path.join(LOG_DIR, "lab")
        with NMLab(seed, base, root=tree.path, env={"DEBIAN_FRONTEND": "noninteractive"}) as nm:
            print(f"  namespaces {lab.prefix}{{mon,rtr,host}}; NetworkManager pid {nm.nm_pid} runs in "
                  f"{tree.path}; logs in {base}")
            ok = play(nm, seed, tree)
    left = [n for n in run(["ip", "netns", "list"]).stdout.split() if n.startswith(lab.prefix)]
    return verdict("lab namespaces removed", not left) and ok


def play(nm: NMLab, seed: Seed, tree: Tree) -> bool:
    host = seed.host
    ok = check_installed(nm, tree)
    nm.seed_keyfiles()
    nm.up("mgmt")
    nm.up("service")
    svm_before = host.conf("ipv4", "eth1", "src_valid_mark")
    say("Before the policy: replies to the monitoring host leave by eth0 and are dropped")
    ok = verdict("nothing of ours in the host namespace", clean(ours(nm), svm_before)) and ok
    ok = probe(seed, expect=False) and ok

    say("The installed CLI sets the policy on 'service'")
    command = f"{PACKAGE} set service {' '.join(POLICY)}"
    out = cli(nm, "set", "service", *POLICY)
    show(f"$ {command}", out.stdout + out.stderr)
    ok = verdict("set exits 0", out.returncode == 0) and ok
    ok = verdict("set applied it (no daemon runs)", bool(wait_for(lambda: applied(ours(nm)), 10))) and ok

    say("nmcli connection down/up service: the installed dispatcher hook removes and applies it")
    nm.down("service")
    ok = verdict("down: the hook removed it, src_valid_mark restored",
                 bool(wait_for(lambda: clean(ours(nm), svm_before), 15))) and ok
    nm.up("service")
    ok = verdict("up: the hook applied it", bool(wait_for(lambda: applied(ours(nm)), 15))) and ok
    show("what is installed now:", installed_view(nm))
    ok = probe(seed, expect=True) and ok
    status = cli(nm, "status")
    show(f"$ {PACKAGE} status", status.stdout + status.stderr)
    ok = verdict("status: 'service' applied", status.returncode == 0 and
                 any("service" in line and "applied" in line for line in status.stdout.splitlines())) and ok
    ok = vpn_step(nm, seed, ours, applied) and ok
    return remove_package(nm, seed, tree, svm_before) and ok


def check_installed(nm: NMLab, tree: Tree) -> bool:
    version = nm.nmcli("--version").stdout.split()[-1]
    where = nm.run_in_host("sh", "-c", f"command -v {PACKAGE}; python3 --version").stdout.split("\n")
    print(f"  NetworkManager {version}; {PACKAGE} is {where[0]} ({where[1]})")
    ok = verdict(f"the CLI is the package's ({where[0]})", where[0] == f"/usr/bin/{PACKAGE}")
    ok = verdict(f"hook {HOOK} (+ pre-up.d, pre-down.d)", all(
        os.path.exists(tree.inside(os.path.join(os.path.dirname(HOOK), sub, os.path.basename(HOOK))))
        for sub in ("", "pre-up.d", "pre-down.d"))) and ok
    return ok


def remove_package(nm: NMLab, seed: Seed, tree: Tree, svm_before: int) -> bool:
    say(f"apt-get remove {PACKAGE}, the connection still up: its prerm flushes the lab's host namespace")
    proc = nm.run_in_host("apt-get", "remove", "-y", PACKAGE, check=False, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("(Reading database")]
    show(f"$ apt-get remove -y {PACKAGE}   (in the lab's namespaces)", "\n".join(lines[-8:]))
    ok = verdict("apt-get remove exits 0", proc.returncode == 0)
    ok = verdict("'service' is still active",
                 "service" in nm.nmcli("-t", "-f", "NAME", "connection", "show", "--active").stdout.split()) and ok
    state = ours(nm)
    show("what is installed now:", installed_view(nm))
    ok = verdict("no rule with protocol 214", not state["rules"]) and ok
    ok = verdict("no route with protocol 214 in any table", not state["routes"]) and ok
    ok = verdict("no nft table inet nm_policy_routing", not state["nft"]) and ok
    ok = verdict(f"eth1 src_valid_mark back to {svm_before}", state["svm"] == svm_before) and ok
    ok = verdict("package removed, nothing of it left in /usr", not tree.installed(PACKAGE) and not any(
        os.path.lexists(tree.inside(p)) for p in (HOOK, f"/usr/bin/{PACKAGE}",
                                                  "/usr/lib/python3/dist-packages/nm_policy_routing"))) and ok
    return ok


# ---- main -------------------------------------------------------------------------


def steps(tree: Tree, args: argparse.Namespace, started: float) -> bool:
    def step(title: str) -> None:
        say(f"{title}   [{time.monotonic() - started:.0f} s]")

    step(f"1. The Debian 13 tree {tree.path}")
    prepare_tree(tree)
    step("2. Building the package from a clean copy of the repository")
    deb = build(tree, ROOT, args.worktree)
    step("3. lintian")
    lint(tree, deb)
    step("4. Installing the package in the tree")
    install(tree, deb)
    step("5. The seed scenario with the tree's NetworkManager and the installed package")
    return scenario(tree)


def cleanup(tree: Tree) -> None:
    if os.path.isdir(tree.path) and tree.complete() and tree.known(PACKAGE):
        tree.purge()
        print(f"  {PACKAGE} purged from the tree (it stays a cache for the next run)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="./run deb-test", description=(
        "Build the .deb in a Debian 13 tree, lint it, install it, play the seed scenario with "
        f"Debian 13's NetworkManager, remove it. The tree: $NPR_TRIXIE_TREE (now {TREE}); logs: {LOG_DIR}."))
    parser.add_argument("--worktree", action="store_true",
                        help="build the working tree's files instead of HEAD (uncommitted changes included)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    tree = Tree(TREE, LOG_DIR)
    print(f"logs of this run: {LOG_DIR}")
    try:
        ok = steps(tree, args, started)
    except (Failed, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"\nFAILED: {exc}", flush=True)
        ok = False
    except Exception:  # a bug here: show where, still clean up
        traceback.print_exc()
        ok = False
    finally:
        say("Cleaning up")
        try:
            cleanup(tree)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            print(f"cleanup FAILED: {exc}", flush=True)
            ok = False
    print(f"\n{'PASS' if ok else 'FAIL'}: ./run deb-test ({time.monotonic() - started:.0f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
