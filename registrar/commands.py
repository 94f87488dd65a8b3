"""The single writer's inputs: every command another thread puts into its queue, and nothing else.

paho's network thread enqueues Message, Connected, Disconnected and Subscribed; APScheduler enqueues Tick; the
HTTP API and the CLI enqueue Call; stop() enqueues Stop. The writer handles them in queue order.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from registrar import engine


@dataclass(frozen=True, slots=True)
class Message:
    """An MQTT message from the broker."""

    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Connected:
    """The broker accepted our connection (the first one or a reconnection)."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The broker connection was lost or closed."""

    reason: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The broker acknowledged our subscriptions."""


@dataclass(frozen=True, slots=True)
class Call:
    """Run `fn(state, now)` -> Outcome in the writer; the Outcome as committed completes `future`."""

    fn: Callable[[engine.CoreState, float], engine.Outcome]
    future: Future
    refresh_tokens: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """Time to judge liveness; `at` is when it was requested (the writer's monotonic clock)."""

    at: float


@dataclass(frozen=True, slots=True)
class Stop:
    """Flush, say goodbye to the broker and end the writer."""


Command = Message | Connected | Disconnected | Subscribed | Call | Tick | Stop
