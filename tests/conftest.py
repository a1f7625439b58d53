"""Shared fixtures: labs of network namespaces, removed even when a test fails."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional

import pytest

from tests.lab.netns import PYTHON, Lab, Netns, Seed

ENGINE_CALL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab", "engine_call.py")


def _root_ok() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("nft") is not None


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    if _root_ok():
        return
    skip = pytest.mark.skip(reason="needs root, iproute2 and nftables (network namespaces)")
    for item in items:
        if "kernel" in item.keywords or "nm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture
def seed(lab: Lab) -> Seed:
    return Seed.build(lab)


@pytest.fixture
def state_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="npr-state-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class EngineInNs:
    """Calls the real engine inside a namespace, one process per call (like the hook does)."""

    def __init__(self, ns: Netns, state_dir: str) -> None:
        self.ns = ns
        self.state_dir = state_dir

    def call(self, op: str, env: Optional[Dict[str, str]] = None, **kw: Any) -> Dict[str, Any]:
        req = dict(op=op, state_dir=self.state_dir, **kw)
        proc = self.ns.run(PYTHON, ENGINE_CALL, input=json.dumps(req), check=False,
                           env={**os.environ, **env} if env else None)
        if proc.stderr.strip():
            print(proc.stderr)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(f"engine call failed: {proc.stderr}") from None

    def reconcile(self, *conns: Dict[str, Any]) -> Dict[str, Any]:
        return self.call("reconcile", connections=list(conns))

    def ensure(self, conn: Dict[str, Any]) -> Dict[str, Any]:
        return self.call("ensure", connection=conn)

    def remove(self, uuid: str) -> Dict[str, Any]:
        return self.call("remove", uuid=uuid)


@pytest.fixture
def engine(seed: Seed, state_dir: str) -> EngineInNs:
    return EngineInNs(seed.host, state_dir)


def connection(uuid: str, iface: str, addresses: List[str], gateway4: Optional[str] = None,
               gateway6: Optional[str] = None, **policy: str) -> Dict[str, Any]:
    user = {f"nm-policy-routing.{k.replace('_', '-')}": v for k, v in policy.items()}
    return {"uuid": uuid, "id": f"conn-{iface}", "iface": iface, "addresses": addresses,
            "gateway4": gateway4, "gateway6": gateway6, "user_data": user}
