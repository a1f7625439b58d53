"""An OpenVPN server behind the seed's router, and the client's NetworkManager VPN profile.

Its single job: give end-to-end tests a real VPN (TLS, EC certificates made by
``openssl`` now) whose client is the seed host's NetworkManager
(network-manager-openvpn), plus a namespace beyond the tunnel to send traffic from.

    rtr   r-vpn 10.0.5.1/24  ----  vpn  eth0 10.0.5.2/24 (OpenVPN server, UDP 1194)
                                   vpn  tun0 10.8.0.1/24 (the host's tun0 gets 10.8.0.2)
                                   vpn  f0 10.0.6.1/24  ----  far  eth0 10.0.6.2/24

``far`` reaches the host's tunnel address through the server; the host's replies must
leave by its tun0 (its main table's default route is eth1). NetworkManager starts the
plugin itself (``supports-multiple-connections=true`` in its .name file), in its own
namespaces, so nothing else is needed on the lab bus.
"""

from __future__ import annotations

import os
import subprocess
from typing import Dict, Mapping, Optional

from tests.lab.netns import Lab, Netns, Seed, run, wait_for

VPN_UUID = "5e1f0000-0000-4000-8000-0000000000f9"
SERVER = "10.0.5.2"
TUNNEL_CLIENT = "10.8.0.2"
FAR = "10.0.6.2"

VPN_POLICY = {"nm-policy-routing.enable": "yes", "nm-policy-routing.table": "300",
              "nm-policy-routing.fwmark": "0x4", "nm-policy-routing.priority": "1300"}


def make_certificates(directory: str) -> Dict[str, str]:
    """A CA, a server and a client certificate (EC P-256) in ``directory``; their paths."""
    os.makedirs(directory, exist_ok=True)
    p = {name: os.path.join(directory, name) for name in (
        "ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "client.key", "client.csr",
        "client.crt", "server.ext", "client.ext")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-keyout", p["ca.key"], "-out", p["ca.crt"], "-days", "2",
         "-subj", "/CN=npr-lab-ca"])
    for who, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        with open(p[f"{who}.ext"], "w") as f:
            f.write(f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n")
        run(["openssl", "req", "-new", *ec, "-keyout", p[f"{who}.key"], "-out", p[f"{who}.csr"],
             "-subj", f"/CN=npr-lab-{who}"])
        run(["openssl", "x509", "-req", "-in", p[f"{who}.csr"], "-CA", p["ca.crt"], "-CAkey", p["ca.key"],
             "-CAcreateserial", "-days", "2", "-out", p[f"{who}.crt"], "-extfile", p[f"{who}.ext"]])
    for path in p.values():
        os.chmod(path, 0o644 if path.endswith(".crt") else 0o600)
    return p


class VpnServer:
    """The ``vpn`` and ``far`` namespaces and an OpenVPN server; stopped by :meth:`stop`."""

    def __init__(self, lab: Lab, seed: Seed, directory: str) -> None:
        self.seed, self.directory = seed, directory
        self.vpn: Netns = lab.ns("vpn")
        self.far: Netns = lab.ns("far")
        lab.link(seed.rtr, "r-vpn", self.vpn, "eth0")
        seed.rtr.ip("addr", "add", "10.0.5.1/24", "dev", "r-vpn")
        self.vpn.ip("addr", "add", f"{SERVER}/24", "dev", "eth0")
        self.vpn.ip("route", "add", "default", "via", "10.0.5.1")
        lab.link(self.vpn, "f0", self.far, "eth0")
        self.vpn.ip("addr", "add", "10.0.6.1/24", "dev", "f0")
        self.far.ip("addr", "add", f"{FAR}/24", "dev", "eth0")
        self.far.ip("route", "add", "default", "via", "10.0.6.1")
        self.vpn.sysctl("net.ipv4.ip_forward", 1)
        self.certs = make_certificates(os.path.join(directory, "pki"))
        self.log = os.path.join(directory, "openvpn-server.log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        c = self.certs
        args = ["ip", "netns", "exec", self.vpn.name, "openvpn", "--dev", "tun0", "--dev-type", "tun",
                "--proto", "udp", "--local", SERVER, "--port", "1194",
                "--server", "10.8.0.0", "255.255.255.0", "--topology", "subnet",
                "--ca", c["ca.crt"], "--cert", c["server.crt"], "--key", c["server.key"], "--dh", "none",
                "--keepalive", "2", "10", "--verb", "3"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if not wait_for(lambda: self._ready() or self.proc.poll() is not None, timeout=15) or self.proc.poll():
            raise RuntimeError(f"the OpenVPN server did not start: {self.tail()}")

    def _ready(self) -> bool:
        return "Initialization Sequence Completed" in self.tail(200)

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def keyfile(self, user: Optional[Mapping[str, str]] = None, name: str = "vpn",
                uuid: str = VPN_UUID) -> str:
        """The client's profile: TLS, never the default route, pushed routes ignored."""
        c = self.certs
        text = (f"[connection]\nid={name}\nuuid={uuid}\ntype=vpn\nautoconnect=false\n\n"
                "[vpn]\nservice-type=org.freedesktop.NetworkManager.openvpn\nconnection-type=tls\n"
                f"remote={SERVER}:1194\nca={c['ca.crt']}\ncert={c['client.crt']}\nkey={c['client.key']}\n"
                "cert-pass-flags=4\ndev=tun0\ndev-type=tun\n\n"
                "[ipv4]\nmethod=auto\nnever-default=true\nignore-auto-routes=true\n\n"
                "[ipv6]\nmethod=ignore\n")
        if user:
            text += "\n[user]\n" + "".join(f"{k}={v}\n" for k, v in user.items())
        return text

    def tunnel_gone(self, timeout: float = 15) -> bool:
        """Wait for the host's tun0 to vanish: it lingers briefly after ``nmcli connection down``
        returns, and a new activation with the same ``dev`` fails while it exists."""
        return bool(wait_for(lambda: self.seed.host.ip("link", "show", "tun0", check=False).returncode != 0,
                             timeout=timeout))

    # ---- traffic from beyond the tunnel ---------------------------------

    def ping(self, dst: str = TUNNEL_CLIENT, count: int = 2) -> bool:
        args = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", dst]
        return self.far.run(*args, check=False, timeout=30).returncode == 0

    def tcp(self, dst: str = TUNNEL_CLIENT, port: int = 8022) -> bool:
        from tests.lab.netns import tcp_check

        return tcp_check(self.seed.host, self.far, dst, port)
