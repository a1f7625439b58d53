"""A tiny TCP echo server / client for the labs (stdlib only).

serve BIND PORT N     accept N connections, echo what arrives; prints "ready"
connect HOST PORT T   send a line, expect it back within T seconds; exit 0 on success
hold HOST PORT        connect, then echo a line every time stdin gives one (long-lived flow)
"""

import socket
import sys


def serve(bind: str, port: int, count: int) -> None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(8)
    print("ready", flush=True)
    for _ in range(count):
        conn, _ = srv.accept()
        with conn:
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                conn.sendall(data)


def connect(host: str, port: int, timeout: float) -> int:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"hello\n")
            return 0 if sock.recv(16) == b"hello\n" else 1
    except OSError as exc:
        print(f"connect failed: {exc}", file=sys.stderr)
        return 1


def hold(host: str, port: int) -> int:
    sock = socket.create_connection((host, port), timeout=5)
    sock.settimeout(3)
    print("connected", flush=True)
    for line in sys.stdin:
        try:
            sock.sendall(line.encode())
            ok = sock.recv(4096) == line.encode()
        except OSError:
            ok = False
        print("ok" if ok else "fail", flush=True)
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "connect":
        sys.exit(connect(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
    elif cmd == "hold":
        sys.exit(hold(sys.argv[2], int(sys.argv[3])))
