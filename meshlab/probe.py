"""A tiny TCP echo probe for lab nodes: `serve` answers each line with the same line, `connect` checks it,
`hold` keeps one connection busy (a long-lived application connection, e.g. across a roam).

Run inside a node namespace (`python -m meshlab.probe ...`); standard library only, so it starts fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import socketserver
import sys
import time


class _Echo(socketserver.StreamRequestHandler):
    # Long enough for a held connection to ride out a path change (TCP retransmits meanwhile).
    timeout = 120

    def handle(self) -> None:
        try:
            while line := self.rfile.readline(1024):
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


def hold(host: str, port: int, *, interval: float, timeout: float) -> int:
    """One connection, a numbered line every `interval` s, each echo awaited up to `timeout` s; prints `echoed N`
    after every echo. Ends on SIGINT/SIGTERM with `held N` (exit 0), or on a broken connection with the reason
    (exit 1): the connection is what is tested, so it is never re-opened."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    count = 0
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            reader = sock.makefile("rb")
            while not stop:
                line = f"{count}\n".encode()
                sock.sendall(line)
                if reader.readline(64) != line:
                    print(f"broken: the echo of line {count} did not come back", flush=True)
                    return 1
                count += 1
                print(f"echoed {count}", flush=True)
                time.sleep(interval)
    except OSError as exc:
        if not stop:
            print(f"broken: {exc} after {count} lines", flush=True)
            return 1
    print(f"held {count}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlab.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, required=True)
    p_conn = sub.add_parser("connect")
    p_conn.add_argument("host")
    p_conn.add_argument("port", type=int)
    p_conn.add_argument("--timeout", type=float, default=2.0)
    p_hold = sub.add_parser("hold")
    p_hold.add_argument("host")
    p_hold.add_argument("port", type=int)
    p_hold.add_argument("--interval", type=float, default=0.2)
    p_hold.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port)
        return 0
    if args.cmd == "hold":
        return hold(args.host, args.port, interval=args.interval, timeout=args.timeout)
    return 0 if connect(args.host, args.port, timeout=args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
