"""A cgroup listed in ``apps``: the engine attaches the socket-mark program, routes it, and removes it.

Runs the real engine in the seed's host namespace with cgroup2 mounted there (as on a
systemd machine); the cgroup is made in this machine's cgroup2 tree and removed after.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from typing import Any, Dict, Iterator

import pytest

from nm_policy_routing.adapters import cgroupbpf, cgroups
from tests.conftest import ENGINE_CALL, connection
from tests.lab.netns import PYTHON, Seed

pytestmark = pytest.mark.kernel

PEER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "peercheck.py")
WITH_CGROUP2 = ["sh", "-c", 'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"', "sh"]
#: the capabilities the shipped service has (no CAP_SYS_ADMIN: programs are known by the ids recorded)
SERVICE_CAPS = ["setpriv", "--inh-caps=-all,+net_admin,+bpf", "--ambient-caps=-all,+net_admin,+bpf",
                "--bounding-set=-all,+net_admin,+bpf", "--"]


@pytest.fixture
def cgroup() -> Iterator[str]:
    root = cgroups.root()
    if root is None:
        pytest.skip("no cgroup2 hierarchy on this machine")
    name = f"npr-apps-{secrets.token_hex(3)}"
    path = os.path.join(root, name)
    os.mkdir(path)
    try:
        yield name
    finally:
        os.rmdir(path)


CAPS: list = []


def call(seed: Seed, state_dir: str, op: str, **kw: Any) -> Dict[str, Any]:
    req = dict(op=op, state_dir=state_dir, **kw)
    proc = seed.host.run(*WITH_CGROUP2, *CAPS, PYTHON, ENGINE_CALL, input=json.dumps(req), check=False)
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


def client(seed: Seed, cgroup_path: str = "") -> Dict[str, Any]:
    def enter() -> None:
        if cgroup_path:
            with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as handle:
                handle.write(str(os.getpid()))

    proc = subprocess.run(["ip", "netns", "exec", seed.host.name, sys.executable, PEER, "connect", Seed.MON4,
                           "9100"], preexec_fn=enter, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(params=["root", "service-caps"])
def caps(request) -> Iterator[None]:
    CAPS[:] = SERVICE_CAPS if request.param == "service-caps" else []
    yield
    CAPS[:] = []


def test_a_listed_cgroup_leaves_by_the_connection_and_is_unmarked_after(seed: Seed, state_dir: str,
                                                                       cgroup: str, caps: None) -> None:
    path = os.path.join(cgroups.root(), cgroup)
    server = subprocess.Popen(["ip", "netns", "exec", seed.mon.name, sys.executable, PEER, "serve", "9100"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        assert client(seed, path)["seen"] == "10.0.0.2"  # main: the monitoring net via eth0
        # first through eth0, then moved to eth1: the eth0 program must go
        eth0 = connection("u-eth0", "eth0", ["10.0.0.2/24"], "10.0.0.1", enable="yes", match="source",
                          apps=f"cgroup:/{cgroup}")
        out = call(seed, state_dir, "reconcile", connections=[eth0])
        assert out["plans"]["u-eth0"]["status"] == "ok", out
        eth1 = connection("u-eth1", "eth1", ["10.0.1.2/24"], "10.0.1.1", enable="yes", match="source",
                          apps=f"cgroup:/{cgroup}", table="100", fwmark="0x100000/0xf00000")
        out = call(seed, state_dir, "reconcile", connections=[eth1])
        assert out["plans"]["u-eth1"]["status"] == "ok", out
        assert [mark for _, mark in cgroupbpf.attached(path)] == [(0x100000, 0xF00000)]
        answer = client(seed, path)
        assert answer["local"] == answer["seen"] == "10.0.1.2", answer
        assert client(seed)["seen"] == "10.0.0.2"  # not listed: unchanged
        assert call(seed, state_dir, "reconcile", connections=[eth1])["changes"] == []  # idempotent
        out = call(seed, state_dir, "remove", uuid="u-eth1")
        assert any(c.startswith("detach socket mark") for c in out["changes"]), out
        assert cgroupbpf.attached(path) == []
        assert client(seed, path)["seen"] == "10.0.0.2"
        assert seed.host.ipj("-4", "rule", "show", "table", "100") == []
    finally:
        server.kill()
        server.wait()


def test_a_unit_that_is_not_running_waits_without_failing_the_policy(seed: Seed, state_dir: str) -> None:
    eth1 = connection("u-eth1", "eth1", ["10.0.1.2/24"], "10.0.1.1", enable="yes", apps="unit:npr-none.service",
                      table="100")
    out = call(seed, state_dir, "reconcile", connections=[eth1])
    assert out["plans"]["u-eth1"]["status"] == "ok", out
    assert not any("socket mark" in c for c in out["changes"])
    with open(os.path.join(state_dir, "state.json")) as handle:
        notes = json.load(handle)["app_notes"]["u-eth1"]
    assert "unit:npr-none.service waits" in notes[0] or "no cgroup2" in notes[0], notes


def test_a_listed_user_leaves_by_the_connection_in_both_families(seed: Seed, state_dir: str) -> None:
    servers = [subprocess.Popen(["ip", "netns", "exec", seed.mon.name, sys.executable, PEER, "serve", port, *six],
                                stdout=subprocess.PIPE, text=True) for port, six in (("9100", []), ("9106", ["6"]))]
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    def seen(*prefix: str, dst: str, port: str) -> str:
        proc = seed.host.run(*prefix, sys.executable, PEER, "connect", dst, port, check=False)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["seen"]

    try:
        assert all(s.stdout.readline().strip() == "ready" for s in servers)
        eth1 = connection("u-eth1", "eth1", ["10.0.1.2/24", "fd00:1::2/64"], "10.0.1.1", "fd00:1::1",
                          enable="yes", apps="uid:65534", table="100")
        assert call(seed, state_dir, "reconcile", connections=[eth1])["plans"]["u-eth1"]["status"] == "ok"
        assert seen(*nobody, dst=Seed.MON4, port="9100") == "10.0.1.2"
        assert seen(*nobody, dst=Seed.MON6, port="9106") == "fd00:1::2"
        assert seen(dst=Seed.MON4, port="9100") == "10.0.0.2"  # root: main (the monitoring net via eth0)
        assert seen(dst=Seed.MON6, port="9106") == "fd00::2"
        call(seed, state_dir, "remove", uuid="u-eth1")
        assert seen(*nobody, dst=Seed.MON6, port="9106") == "fd00::2"
        assert seed.host.ipj("-6", "rule", "show", "table", "100") == []
    finally:
        for server in servers:
            server.kill()
            server.wait()


def test_a_cgroup_holding_a_foreign_program_is_reported_and_the_rest_applies(seed: Seed, state_dir: str,
                                                                             cgroup: str, monkeypatch) -> None:
    path = os.path.join(cgroups.root(), cgroup)
    monkeypatch.setattr(cgroupbpf, "PROG_NAME", b"someone_else")
    cgroupbpf.attach(path, 0x5, 0xF)  # another tool's socket program on that cgroup
    monkeypatch.undo()
    eth1 = connection("u-eth1", "eth1", ["10.0.1.2/24"], "10.0.1.1", enable="yes", apps=f"cgroup:/{cgroup}",
                      table="100")
    out = call(seed, state_dir, "reconcile", connections=[eth1])
    assert out["plans"]["u-eth1"]["status"] == "ok", out
    assert seed.host.ipj("-4", "rule", "show", "table", "100")  # its rules are in place
    with open(os.path.join(state_dir, "state.json")) as handle:
        (note,) = json.load(handle)["app_notes"]["u-eth1"]
    assert f"cgroup:/{cgroup} is not routed" in note and "not ours: not replaced" in note, note
    assert cgroupbpf.attached(path) == []  # the foreign program is untouched (and not taken for ours)
