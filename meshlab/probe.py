"""A tiny TCP echo probe for lab nodes: `serve` answers each line with the same line, `connect` checks it.

Run inside a node namespace (`python -m meshlab.probe ...`); standard library only, so it starts fast.
"""

from __future__ import annotations

import argparse
import os
import socket
import socketserver
import sys


class _Echo(socketserver.StreamRequestHandler):
    timeout = 10

    def handle(self) -> None:
        try:
            line = self.rfile.readline(1024)
            self.wfile.write(line)
        except OSError:
            pass  # the client went away or timed out: nothing to answer


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(port: int) -> None:
    """Echo one line per connection on every address of this namespace, forever."""
    with _Server(("0.0.0.0", port), _Echo) as server:
        server.serve_forever()


def connect(host: str, port: int, *, timeout: float) -> bool:
    """Connect, send a random line, and check it comes back unchanged."""
    token = os.urandom(8).hex().encode() + b"\n"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(token)
            got = b""
            while not got.endswith(b"\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                got += chunk
    except OSError as exc:
        print(f"probe: {host}:{port}: {exc}", file=sys.stderr)
        return False
    return got == token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlab.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, required=True)
    p_conn = sub.add_parser("connect")
    p_conn.add_argument("host")
    p_conn.add_argument("port", type=int)
    p_conn.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port)
        return 0
    return 0 if connect(args.host, args.port, timeout=args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
