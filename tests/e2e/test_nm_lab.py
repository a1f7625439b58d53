"""The NetworkManager lab works: profiles, routes, dispatcher, restart, DHCP."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from tests.lab.netns import Lab, Seed, run, wait_for
from tests.lab.nm import DHCP_UUID, MGMT_UUID, NM_BIN, SERVICE_UUID, NMLab

pytestmark = pytest.mark.nm

if not (os.path.exists(NM_BIN) and shutil.which("dbus-daemon") and shutil.which("dnsmasq")):
    pytest.skip("needs NetworkManager, dbus-daemon and dnsmasq", allow_module_level=True)

USER = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "100"}


def _root_networking() -> Dict[str, Any]:
    snap = {what: run(["ip", "-j", *what.split()]).stdout
            for what in ("-4 rule", "-6 rule", "-4 route show table all", "-6 route show table all")}
    snap["links"] = sorted(link["ifname"] for link in json.loads(run(["ip", "-j", "link"]).stdout))
    if shutil.which("nft"):
        snap["nft"] = run(["nft", "list", "ruleset"]).stdout
    return snap


@pytest.fixture(scope="module", autouse=True)
def root_untouched() -> Iterator[None]:
    before = _root_networking()
    yield
    assert _root_networking() == before, "the root namespace's networking changed"


@pytest.fixture
def nm(lab: Lab, tmp_path: Any) -> Iterator[NMLab]:
    seed = Seed.build(lab, address_host=False)
    with NMLab(seed, str(tmp_path / "nm")) as the_lab:
        yield the_lab


def addrs(nm: NMLab, iface: str, family: str = "-4") -> List[Dict[str, Any]]:
    return [a for link in nm.host.ipj(family, "addr", "show", "dev", iface) for a in link["addr_info"]
            if a.get("scope") == "global"]


def has_route(nm: NMLab, family: str, dst: str, gateway: str, dev: str) -> bool:
    return any(r["dst"] == dst and r.get("gateway") == gateway and r["dev"] == dev
               for r in nm.host.ipj(family, "route"))


def nm_call(nm: NMLab, path: str, method: str, *args: str) -> str:
    return nm.run_in_host("dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.NetworkManager",
                          path, f"org.freedesktop.NetworkManager.{method}", *args).stdout


def connection_settings(nm: NMLab, uuid: str) -> str:
    """GetSettings as dbus-send prints it (nmcli cannot show the `user` setting)."""
    reply = nm_call(nm, "/org/freedesktop/NetworkManager/Settings", "Settings.GetConnectionByUuid", f"string:{uuid}")
    path = reply.split('object path "', 1)[1].split('"', 1)[0]
    return nm_call(nm, path, "Settings.Connection.GetSettings")


def test_seed_profiles_come_up_with_addresses_and_routes(nm: NMLab) -> None:
    nm.seed_keyfiles(user_service=USER)
    nm.up("mgmt")
    nm.up(SERVICE_UUID)
    assert [a["local"] for a in addrs(nm, "eth0")] == ["10.0.0.2"]
    assert [a["local"] for a in addrs(nm, "eth1")] == ["10.0.1.2"]
    for iface, addr in (("eth0", "fd00::2"), ("eth1", "fd00:1::2")):
        six = addrs(nm, iface, "-6")
        assert [a["local"] for a in six] == [addr]
        assert not six[0].get("tentative") and not six[0].get("dadfailed"), six
        assert nm.host.conf("ipv6", iface, "accept_dad") == 0
    assert has_route(nm, "-4", "default", "10.0.1.1", "eth1")
    assert has_route(nm, "-4", "10.0.9.0/24", "10.0.0.1", "eth0")
    assert has_route(nm, "-6", "default", "fd00:1::1", "eth1")
    assert has_route(nm, "-6", "fd00:9::/64", "fd00::1", "eth0")
    assert not any(r["dst"] == "default" and r["dev"] == "eth0" for r in nm.host.ipj("-4", "route"))
    assert nm.seed.rtr.run("ping", "-n", "-c1", "-W2", "10.0.1.2", check=False).returncode == 0
    assert nm.seed.rtr.run("ping", "-n", "-c1", "-W2", "fd00:1::2", check=False).returncode == 0

    settings = connection_settings(nm, SERVICE_UUID)
    assert '"nm-policy-routing.enable"' in settings and '"nm-policy-routing.table"' in settings

    nm.down("service")
    assert addrs(nm, "eth1") == []
    assert nm.nmcli("-g", "GENERAL.STATE", "connection", "show", "uuid", MGMT_UUID).stdout.strip() == "activated"


DISPATCHER_SCRIPT = """#!/bin/sh
[ "$1" = eth1 ] || exit 0
echo "$1 $2 $CONNECTION_UUID" >>{out}
[ "$2" = up ] || exit 0
lab-marker >>{out}
dbus-send --system --print-reply --dest=org.freedesktop.NetworkManager /org/freedesktop/NetworkManager \\
    org.freedesktop.DBus.Properties.Get string:org.freedesktop.NetworkManager string:Version >/dev/null \\
    && echo "bus ok" >>{out}
touch /run/nm-policy-routing/seen
"""


def executable(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


def test_dispatcher_scripts_run_on_up_and_down(lab: Lab, tmp_path: Any) -> None:
    """Scripts see the lab bus at the default address, the lab's PATH and its binds."""
    bin_dir, state_dir, out = tmp_path / "bin", tmp_path / "state", tmp_path / "events"
    bin_dir.mkdir()
    executable(str(bin_dir / "lab-marker"), "#!/bin/sh\necho marker\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    seed = Seed.build(lab, address_host=False)
    with NMLab(seed, str(tmp_path / "nm"), env=env, binds={"/run/nm-policy-routing": str(state_dir)}) as nm:
        for sub in ("pre-up.d", "pre-down.d", "no-wait.d"):
            assert os.path.isdir(os.path.join(nm.dispatcher_dir, sub))
        script = os.path.join(nm.dispatcher_dir, "50-record")
        executable(script, DISPATCHER_SCRIPT.format(out=out))
        for sub in ("pre-up.d", "pre-down.d"):  # pre-up and pre-down run only these
            os.symlink("../50-record", os.path.join(nm.dispatcher_dir, sub, "50-record"))

        def lines() -> List[str]:
            return out.read_text().splitlines() if out.exists() else []

        nm.seed_keyfiles()
        nm.up("service")
        assert wait_for(lambda: "bus ok" in lines(), timeout=10), lines()
        assert lines() == [f"eth1 pre-up {SERVICE_UUID}", f"eth1 up {SERVICE_UUID}", "marker", "bus ok"]
        assert (state_dir / "seen").exists()
        nm.down("service")
        assert wait_for(lambda: f"eth1 down {SERVICE_UUID}" in lines(), timeout=10), lines()
        assert lines()[4:] == [f"eth1 pre-down {SERVICE_UUID}", f"eth1 down {SERVICE_UUID}"]


def test_restart_keeps_devices_configured(nm: NMLab) -> None:
    nm.seed_keyfiles()
    nm.up("mgmt")
    nm.up("service")
    before = (addrs(nm, "eth1"), addrs(nm, "eth1", "-6"), nm.host.ipj("-4", "route"))
    old_pid = nm.nm_pid
    nm.restart_nm()
    assert nm.nm_pid != old_pid
    assert wait_for(lambda: nm.device_state("eth1") == "connected", timeout=10), nm.device_state("eth1")
    assert nm.nmcli("-g", "GENERAL.CONNECTION", "device", "show", "eth1").stdout.strip() == "service"
    assert (addrs(nm, "eth1"), addrs(nm, "eth1", "-6"), nm.host.ipj("-4", "route")) == before
    assert "device (eth1): state change: unmanaged -> unavailable (reason 'connection-assumed'" \
        in Path(nm.nm_log).read_text(), "NetworkManager should take eth1 over as it is"
    nm.down("service")
    assert addrs(nm, "eth1") == []


def in_range(address: str, start: str, end: str) -> bool:
    return ipaddress.ip_address(start) <= ipaddress.ip_address(address) <= ipaddress.ip_address(end)


def test_dhcp_profile_gets_an_address_and_can_be_renumbered(nm: NMLab) -> None:
    nm.start_dhcp_server("10.0.1.100", "10.0.1.150", lease_seconds=120)
    nm.dhcp_keyfile("dhcp", user=USER)
    nm.up("dhcp")
    first = [a["local"] for a in addrs(nm, "eth1")]
    assert len(first) == 1 and in_range(first[0], "10.0.1.100", "10.0.1.150"), first
    assert has_route(nm, "-4", "default", "10.0.1.1", "eth1")

    address = nm.renumber_dhcp("10.0.1.200", "10.0.1.210")
    assert in_range(address, "10.0.1.200", "10.0.1.210")
    assert [a["local"] for a in addrs(nm, "eth1")] == [address]
    assert nm.device_state("eth1") == "connected"
    assert has_route(nm, "-4", "default", "10.0.1.1", "eth1")
    assert wait_for(lambda: "'reapply' [eth1]" in Path(nm.dispatcher_log).read_text(), timeout=5)

    address = nm.renumber_dhcp("10.0.1.220", "10.0.1.230", reactivate=True)
    assert [a["local"] for a in addrs(nm, "eth1")] == [address]
    assert nm.nmcli("-g", "GENERAL.CONNECTION", "device", "show", "eth1").stdout.strip() == "dhcp"
    assert nm.nmcli("-g", "connection.uuid", "connection", "show", "dhcp").stdout.strip() == DHCP_UUID
