"""LocalApiServer's serving thread: answers every connection, and stop() ends it at once without it polling."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshcontract.localapi import LocalRequest, LocalResponse, query
from nodeagent.localapi_server import LocalApiServer


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="mvls", dir="/tmp"))
    try:
        yield directory / "agent.sock"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def answer(request: LocalRequest, *, caller_uid: int | None) -> LocalResponse:
    return LocalResponse(ok=request.op == "status", error=None if request.op == "status" else f"uid {caller_uid}")


def serving_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "agent-localapi"]


@pytest.mark.parametrize("requests", [0, 1, 5])
def test_answers_then_stops_at_once(socket_path, requests):
    server = LocalApiServer(socket_path, answer)
    server.start()
    try:
        for _ in range(requests):
            assert query(LocalRequest(op="status"), socket_path=str(socket_path), timeout=5).ok
    finally:
        started = time.monotonic()
        server.stop()
        stopped_in = time.monotonic() - started
    assert stopped_in < 2.0  # a wake-up, not a timeout: generous only for a loaded machine
    assert not serving_threads()
    assert not socket_path.exists()
    server.stop()  # twice is harmless


def test_concurrent_clients_are_all_answered(socket_path):
    server = LocalApiServer(socket_path, answer)
    server.start()
    results: list[bool] = []
    try:
        clients = [
            threading.Thread(
                target=lambda: results.append(
                    query(LocalRequest(op="ping", target="n1"), socket_path=str(socket_path), timeout=5).error
                    == f"uid {os.getuid()}"
                )
            )
            for _ in range(8)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(10)
    finally:
        server.stop()
    assert results == [True] * 8
