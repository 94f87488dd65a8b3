"""Delivery latency of the chat on loopback, without WireGuard, to compare with the lab.

    python bench/bench_chat_loopback.py [--messages 200] [--history memory|sqlite]

Two ChatSessions on 127.0.0.2 and 127.0.0.3 (Linux loopback); each message is a full exchange (connect, send,
store, ack), timed from the sender. Prints one line: median, p95 and max in milliseconds.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from desktop_chat.history import HistoryStore, MemoryHistory, SqliteHistory  # noqa: E402
from desktop_chat.peers import MemoryPeerSource, PeerDirectory, static_status  # noqa: E402
from desktop_chat.session import ChatSession  # noqa: E402


def _session(ip: str, peer: str, port: int, history: HistoryStore) -> ChatSession:
    now = time.time()
    directory = PeerDirectory()
    directory.update(MemoryPeerSource(static_status(self_ip=ip, name=ip, member_ips=[peer], now=now)).snapshot(now=now))
    return ChatSession(history=history, directory=directory, port=port, timeout=5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--history", choices=("memory", "sqlite"), default="memory")
    args = parser.parse_args(argv)
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        def store(name: str) -> HistoryStore:
            return MemoryHistory() if args.history == "memory" else SqliteHistory(Path(tmp) / f"{name}.db")

        sender = _session("127.0.0.2", "127.0.0.3", port, store("a"))
        receiver = _session("127.0.0.3", "127.0.0.2", port, store("b"))
        receiver.ensure_listening()
        sender.ensure_listening()
        times = []
        try:
            for i in range(args.messages):
                start = time.perf_counter()
                record = sender.send_now("127.0.0.3", f"message {i}")
                times.append((time.perf_counter() - start) * 1000)
                if record.status != "delivered":
                    print(f"message {i} failed: {record.reason}")
                    return 1
        finally:
            sender.close()
            receiver.close()
    times.sort()
    print(f"{args.messages} messages, {args.history} history: median {statistics.median(times):.2f} ms, "
          f"p95 {times[int(len(times) * 0.95) - 1]:.2f} ms, max {times[-1]:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
