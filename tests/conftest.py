"""Shared pytest fixtures. Keep this small and importable: helpers live in modules next to it (tests/brokers.py)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Make `tests.brokers` importable as `brokers` too, whatever the rootdir / import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from brokers import RunningBroker, start_embedded, start_mosquitto  # noqa: E402

BrokerFactory = Callable[..., RunningBroker]


@pytest.fixture(params=["amqtt", "mosquitto"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerFactory]:
    """A factory `make(users=None, mesh=...) -> RunningBroker` for each broker kind; every one made is stopped after."""
    kind = request.param
    if kind == "mosquitto" and shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    started: list[RunningBroker] = []

    def make(users: dict[str, str] | None = None, *, mesh: str | None = None) -> RunningBroker:
        """`mesh`: the mesh node accounts in `users` belong to (Mosquitto: their roles' topics, default m1) and
        that the embedded broker is bound to (default: none, any mesh)."""
        if kind == "mosquitto":
            broker = start_mosquitto(tmp_path, users=users, mesh=mesh or "m1")
        else:
            broker = start_embedded(tmp_path, users=users, mesh=mesh)
        started.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in started:
            broker.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[RunningBroker]:
    """One Mosquitto (anonymous, no ACL) on a random port, for tests that need only one broker kind."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    running = start_mosquitto(tmp_path)
    try:
        yield running
    finally:
        running.stop()
