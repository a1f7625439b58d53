"""Who does the server see? A TCP server that answers each line with the peer's address, and its client.

serve PORT [6]        accept connections (threads), answer each line with the peer's address
                      (IPv4, or IPv6 with a second argument 6)
connect HOST PORT     connect, print {"local", "seen", "uid"} as JSON; exit 1 if it fails
hold HOST PORT        connect, print the JSON, then for each stdin line print {"ok", "seen"} (a long flow)
"""

import json
import os
import socket
import sys
import threading


def serve(port: int, six: bool = False) -> None:
    srv = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::" if six else "0.0.0.0", port))
    srv.listen(16)
    print("ready", flush=True)
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=_answer, args=(conn, peer[0]), daemon=True).start()


def _answer(conn: socket.socket, peer: str) -> None:
    with conn:
        for _ in conn.makefile("rb"):
            conn.sendall(peer.encode() + b"\n")


def _ask(sock: socket.socket) -> str:
    sock.sendall(b"who\n")
    return sock.makefile("rb").readline().decode().strip()


def connect(host: str, port: int) -> int:
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            print(json.dumps({"local": sock.getsockname()[0], "seen": _ask(sock), "uid": os.getuid()}))
            return 0
    except OSError as exc:
        print(f"connect failed: {exc}", file=sys.stderr)
        return 1


def hold(host: str, port: int) -> int:
    sock = socket.create_connection((host, port), timeout=3)
    print(json.dumps({"local": sock.getsockname()[0], "seen": _ask(sock), "uid": os.getuid()}), flush=True)
    for _ in sys.stdin:
        try:
            print(json.dumps({"ok": True, "seen": _ask(sock)}), flush=True)
        except OSError as exc:
            print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3:] == ["6"])
    elif sys.argv[1] == "connect":
        sys.exit(connect(sys.argv[2], int(sys.argv[3])))
    else:
        sys.exit(hold(sys.argv[2], int(sys.argv[3])))
