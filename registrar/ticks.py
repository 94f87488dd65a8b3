"""When the writer judges liveness: a requested tick runs once what had arrived before it has been read.

Pure: no I/O here and no clock read; the writer passes `now` (its monotonic clock).

APScheduler requests a tick every `interval_s` by putting a Tick into the writer's queue, so a tick always comes
after every message queued before it. Silence is judged only after reading what has arrived: heartbeats queued
behind a slow batch (a long commit) must count before the clock does. So a tick that finds more messages
queued behind it waits for them too, but under a flood that never lets the queue run empty it runs at most one
interval after it was requested. A tick requested while another one waits merges into the older request.
"""

from __future__ import annotations


def default_interval(ttl_s: float) -> float:
    """The tick interval when none is configured: a fifth of the TTL, between 50 ms and 1 s."""
    return min(1.0, max(0.05, ttl_s / 5))


def requested(waiting_since: float | None, *, at: float) -> float:
    """A tick was requested at `at`; returns since when a tick has been waiting (the older request wins)."""
    return at if waiting_since is None else min(waiting_since, at)


def run_now(waiting_since: float, *, now: float, queue_empty: bool, interval_s: float) -> bool:
    """Whether the tick waiting since `waiting_since` runs now: once the queue is empty, or one interval late."""
    return queue_empty or now >= waiting_since + interval_s
