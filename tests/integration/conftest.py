"""Fixtures of the integration tests: a broker of each kind, a registrar subprocess on it, a mesh of agents.

Modules that need something else (only Mosquitto, a registrar with particular settings) define a fixture of
the same name, which takes precedence over these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokers import RunningBroker
from harness import REGISTRAR_PASSWORD, Mesh, Registrar


@pytest.fixture
def broker(any_broker: Callable[..., RunningBroker]) -> RunningBroker:
    """Each case runs on the embedded broker (amqtt) and on Mosquitto, with access control as in production:
    the registrar's account exists, nodes get theirs when they enroll."""
    return any_broker(users={"registrar": REGISTRAR_PASSWORD})


@pytest.fixture
def registrar(tmp_path: Path, broker: RunningBroker) -> Iterator[Registrar]:
    """A registrar subprocess on `broker`, killed after the test."""
    reg = Registrar(broker, tmp_path / "registrar")
    try:
        reg.start()
        yield reg
    finally:
        reg.kill()


@pytest.fixture
def mesh(tmp_path: Path, broker: RunningBroker, registrar: Registrar) -> Iterator[Mesh]:
    """An empty mesh of in-process agents joining `registrar` with a reusable token; every agent stopped after."""
    m = Mesh(tmp_path, registrar)
    try:
        yield m
    finally:
        m.close()
