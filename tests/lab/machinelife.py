"""The later steps of ``./run machine-test``: the seed lifecycle with the upgraded package,
restart and stop/start, an unprivileged user and polkit, the journal, two reboots, purge."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from tests.lab.debtest import POLICY, clean
from tests.lab.demo import show
from tests.lab.machine import Machine
from tests.lab.machineapps import apps_steps
from tests.lab.machinesteps import (MODIFY_SYSTEM, PACKAGE_FILES, POLKIT_RULE, Checks, cli, exactly_once, ours,
                                    replies_by_eth1, service, wait_service, wait_state)
from tests.lab.netns import Seed, wait_for
from tests.lab.nm import SERVICE_UUID
from tests.lab.trixie import PACKAGE


def later_steps(m: Machine, seed: Seed, checks: Checks, svm0: int) -> None:
    lifecycle(m, seed, checks, svm0)
    restarts(m, seed, checks)
    apps_steps(m, seed, checks, "7a. Per-application routing: a listed unit and 'run --via' leave by eth1")
    unprivileged(m, checks)
    journal(m, checks)
    reboots(m, seed, checks)
    purge(m, checks, svm0)


def lifecycle(m: Machine, seed: Seed, checks: Checks, svm0: int) -> None:
    checks.step("6. The seed lifecycle with the installed CLI and the running service")
    out = cli(m, "set", "service", "enable", "no")
    checks.check("set service enable no: the service removed the policy",
                 out.returncode == 0 and wait_state(m, lambda s: clean(s, svm0)))
    out = cli(m, "set", "service", *POLICY)
    show(f"$ {PACKAGE} set service {' '.join(POLICY)}", out.stdout + out.stderr)
    checks.check("set service ... : applied again", out.returncode == 0 and wait_state(m, exactly_once))
    m.exec("nmcli", "connection", "down", "service")
    checks.check("nmcli connection down service: removed, src_valid_mark restored",
                 wait_state(m, lambda s: clean(s, svm0)))
    m.exec("nmcli", "--wait", "30", "connection", "up", "service")
    rules4 = [r for r in m.netns.ipj("-4", "rule") if r.get("priority") == 1000 and str(r.get("table")) == "100"]
    # NetworkManager 1.52 shows no IP configuration over D-Bus on pre-up: the service takes the facts from
    # what the kernel holds on eth1 (IPv6 follows duplicate address detection)
    checks.check("nmcli connection up service: its IPv4 policy in the kernel already when it returns (the hook "
                 "handed pre-up to the service, which answered once verified)", len(rules4) == 1)
    checks.check("nmcli connection up service: applied", wait_state(m, exactly_once))
    mode = m.exec("stat", "-c", "%a %U", f"/run/{PACKAGE}/handoff.sock", check=False).stdout.strip()
    handed = m.exec("journalctl", "-u", PACKAGE, "-b", "--no-pager", "-o", "cat", check=False).stdout
    show("the service's journal, events handed over by the hook:",
         "\n".join(line for line in handed.splitlines() if " for service " in line or "service" in line
                   and ("pre-" in line or " of " in line))[-3000:])
    checks.check(f"handoff.sock is root's only ({mode}); the service's journal shows the handed-over pre-up "
                 "and up", mode == "600 root" and any("pre-up for service" in line for line in handed.splitlines())
                 and any(line.startswith("up for service") for line in handed.splitlines()))
    replies_by_eth1(checks, seed, m)
    status = cli(m, "status")
    show(f"$ {PACKAGE} status", status.stdout + status.stderr)
    checks.check("status: 'service' applied", status.returncode == 0 and any(
        "service" in line and "applied" in line for line in status.stdout.splitlines()))


def restarts(m: Machine, seed: Seed, checks: Checks) -> None:
    checks.step("7. systemctl restart, stop, start")
    m.exec("systemctl", "restart", PACKAGE)
    checks.check("restart: active again; the policy applied once, no duplicate",
                 wait_service(m) and wait_state(m, exactly_once))
    m.exec("systemctl", "stop", PACKAGE)
    checks.check("stop: the service is inactive, the policy stays", service(m)[0] == "inactive"
                 and exactly_once(ours(m)))
    m.exec("systemctl", "start", PACKAGE)
    checks.check("start: active; the policy applied once, no duplicate",
                 wait_service(m) and wait_state(m, exactly_once))
    replies_by_eth1(checks, seed, m)


def unprivileged(m: Machine, checks: Checks) -> None:
    checks.step("8. An unprivileged user: refused, then allowed by a polkit rule")
    m.sh("groupadd -f netadmin && (id alice >/dev/null 2>&1 || useradd -m -U -G netadmin alice)")
    out = cli(m, "set", "service", "rp-filter", "keep", user="alice")
    show(f"alice$ {PACKAGE} set service rp-filter keep   (exit {out.returncode})", out.stdout + out.stderr)
    checks.check("exit 77 (not permitted)", out.returncode == 77)
    words = ("not permitted to modify connection 'service'", SERVICE_UUID, MODIFY_SYSTEM, "sudo")
    checks.check("the message names the connection, the polkit action and sudo",
                 all(w in out.stderr for w in words))
    m.put("/etc/polkit-1/rules.d/50-nm-policy-routing.rules", POLKIT_RULE.encode())
    show("/etc/polkit-1/rules.d/50-nm-policy-routing.rules", POLKIT_RULE)

    def allowed() -> Any:
        proc = cli(m, "set", "service", "rp-filter", "keep", user="alice")
        return proc if proc.returncode == 0 else None
    out = wait_for(allowed, 20, 1)  # polkitd reloads its rules when the directory changes
    if out:
        show(f"alice$ {PACKAGE} set service rp-filter keep", out.stdout + out.stderr)
    checks.check("with the rule (alice in group netadmin): exit 0", bool(out))
    out = cli(m, "unset", "service", "rp-filter", user="alice")
    checks.check("alice unsets it again: exit 0; the policy stays applied",
                 out.returncode == 0 and wait_state(m, exactly_once))


def _journal(m: Machine, *match: str) -> List[Dict[str, Any]]:
    out = m.exec("journalctl", "-b", "-o", "json", "--no-pager", *match, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def twice(entries: List[Dict[str, Any]]) -> List[str]:
    """Messages logged twice in a row within a second (what stderr + syslog to the journal did);
    the same story told again by a later event (removed, applied, removed) is not a duplicate."""
    out = []
    for before, entry in zip(entries, entries[1:]):
        text = str(entry.get("MESSAGE"))
        if text == str(before.get("MESSAGE")) and \
                int(entry["__REALTIME_TIMESTAMP"]) - int(before["__REALTIME_TIMESTAMP"]) < 1_000_000:
            out.append(text)
    return out


def journal(m: Machine, checks: Checks) -> None:
    checks.step("9. The journal, filtered by the service connection's UUID")
    command = f"journalctl -b -u {PACKAGE} CONNECTION_UUID={SERVICE_UUID}"
    text = m.exec("journalctl", "-b", "-u", PACKAGE, f"CONNECTION_UUID={SERVICE_UUID}", "--no-pager",
                  "-o", "short-precise").stdout
    show(f"$ {command}", text)
    story = _journal(m, "-u", PACKAGE, f"CONNECTION_UUID={SERVICE_UUID}")
    words = [e.get("MESSAGE", "") for e in story]
    checks.check(f"{len(story)} entries: the story has 'policy applied' and 'policy removed'",
                 any("policy applied" in w for w in words) and any("policy removed" in w for w in words))
    checks.check("every entry names it (id, UUID, eth1) in text and in CONNECTION_ID, NM_DEVICE", all(
        "'service'" in e.get("MESSAGE", "") and SERVICE_UUID in e.get("MESSAGE", "") and "eth1" in e.get("MESSAGE", "")
        and e.get("CONNECTION_ID") == "service" and e.get("NM_DEVICE") == "eth1" for e in story))
    # this version's service (the previous version, before the upgrade, logged by stdout and syslog)
    unit = [e for e in _journal(m, "-u", PACKAGE) if e.get("_COMM") != "systemd"
            and e.get("_PID") not in m.previous_pids]
    transports = sorted({e.get("_TRANSPORT", "?") for e in unit})
    checks.check(f"the service's {len(unit)} own entries come by the native protocol alone ({transports})",
                 transports == ["journal"])
    dup = twice(unit)
    checks.check("nothing twice" + (f": {dup[:2]}" if dup else ""), not dup)
    levels = {(e.get("PRIORITY"), "refused" if "refused" in e.get("MESSAGE", "") else "story") for e in story}
    checks.check(f"applied/removed are info (PRIORITY 6), refused is an error (3): {sorted(levels)}",
                 levels <= {("6", "story"), ("3", "refused")})


def reboots(m: Machine, seed: Seed, checks: Checks) -> None:
    checks.step("10. Reboot (the service enabled)")
    seconds = m.reboot()
    checks.check(f"booted again in {seconds:.1f} s; mgmt and service activated", m.wait_active(["mgmt", "service"]))
    checks.check("the service runs; the policy applied once", wait_service(m) and wait_state(m, exactly_once))
    replies_by_eth1(checks, seed, m)

    checks.step("11. Reboot with the service disabled: it starts after NetworkManager activated the connections")
    m.exec("systemctl", "disable", PACKAGE)
    seconds = m.reboot()
    checks.check(f"booted in {seconds:.1f} s; mgmt and service activated; the service is not running",
                 m.wait_active(["mgmt", "service"]) and service(m)[0] == "inactive")
    checks.check("the dispatcher hook applied the policy", wait_state(m, exactly_once))
    hook = _journal(m, f"CONNECTION_UUID={SERVICE_UUID}")
    show(f"$ journalctl -b CONNECTION_UUID={SERVICE_UUID}",
         "\n".join(f"{e.get('_SYSTEMD_UNIT', '?')} {e.get('SYSLOG_IDENTIFIER')}: {e.get('MESSAGE')}" for e in hook))
    ours_ = [e for e in hook if e.get("SYSLOG_IDENTIFIER") == PACKAGE]
    everywhere = [e for e in _journal(m) if "policy applied" in str(e.get("MESSAGE"))]
    checks.check("the hook's entries name it; nothing twice in the whole journal",
                 bool(ours_) and not twice(everywhere))
    m.exec("systemctl", "enable", "--now", PACKAGE)
    checks.check("systemctl enable --now: active; the policy applied once, no duplicate",
                 wait_service(m) and wait_state(m, exactly_once))
    replies_by_eth1(checks, seed, m)


def purge(m: Machine, checks: Checks, svm0: int) -> None:
    checks.step("12. apt-get purge with the connection up")
    cli(m, "set", "service", "apps", "unit:npr-listed.service")  # a drop-in for purge to remove
    dropin = "/etc/systemd/system/npr-listed.service.d/50-nm-policy-routing.conf"
    checks.check("a listed service has its drop-in before the purge", m.sh(f"test -f {dropin}", check=False).returncode == 0)
    out = m.exec("apt-get", "purge", "-y", PACKAGE, check=False, timeout=600)
    show(f"$ apt-get purge -y {PACKAGE}", "\n".join((out.stdout + out.stderr).splitlines()[-6:]))
    checks.check("apt-get purge exits 0; 'service' still active",
                 out.returncode == 0 and m.active().get("service") == "activated")
    state = ours(m)
    checks.check("no rule or route of ours (protocol 214), no nft table inet nm_policy_routing",
                 not state["rules"] and not state["routes"] and not state["nft"])
    checks.check(f"eth1 src_valid_mark back to {svm0}", state["svm"] == svm0)
    left = m.sh("for f in " + " ".join(PACKAGE_FILES) + "; do [ -e $f ] || [ -L $f ] && echo $f; done; "
                f"dpkg-query -W -f='${{Status}}' {PACKAGE} 2>/dev/null; true").stdout.split("\n")
    left = [line for line in left if line.strip()]
    checks.check("no file of the package left, dpkg forgot it" + (f": {left}" if left else ""), not left)
    checks.check("the service is gone", m.exec("systemctl", "cat", PACKAGE, check=False).returncode != 0)
    unit = m.exec("systemctl", "cat", "npr-listed.service", check=False).stdout
    checks.check("the drop-in 'set ... apps' wrote is gone (and systemd forgot it)",
                 m.sh(f"test -e {dropin} || test -e {dropin.rsplit('/', 1)[0]}", check=False).returncode != 0
                 and "unit-start" not in unit)
