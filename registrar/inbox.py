"""The writer's one ordered queue of commands, in which plain heartbeats may wait to be read in bunches.

Every input reaches the writer through one Inbox, in arrival order (registrar.commands). Most commands wake the
writer at once (`put`). Heartbeats of active members are not urgent: they only move `last_seen`, and liveness
is judged on the TTL's scale, so paho's thread adds them with `put_lingering`, which wakes the writer only once
the oldest of them has waited `linger_s`. At 10,000 members heartbeating every 5 s (2,000 messages a second,
evenly spread) a wake per message cost the writer a round of its loop and paho's thread a hand-off each; with
a linger the writer reads them by the hundred. A lingering command is never passed: whatever is put after it
(a goodbye of the same node, a registration, a call, a tick, Stop) is read after it, and an urgent command
ends every linger before it, so it never waits for one.

`wakes` is the pure rule of when the writer may stop waiting; the Inbox is the lock around a deque that applies it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

LINGER_S = 0.05  # how long a lingering command may wait for the writer at most (before its own decision time)


def wakes(*, urgent: bool, lingering_since: float | None, now: float, linger_s: float, deadline: float | None) -> bool:
    """Whether the writer stops waiting: something urgent is queued, the oldest lingering command has waited
    `linger_s`, or the writer's own `deadline` (None: none) has come."""
    if urgent:
        return True
    if lingering_since is not None and now >= lingering_since + linger_s:
        return True
    return deadline is not None and now >= deadline


def next_wake(*, lingering_since: float | None, linger_s: float, deadline: float | None) -> float | None:
    """When the writer must look again if nothing urgent comes: the end of the linger or its deadline, if any."""
    if lingering_since is None:
        return deadline
    end = lingering_since + linger_s
    return end if deadline is None else min(end, deadline)


class Inbox:
    """A FIFO of commands for one reader (the writer) and any number of writers; `take` returns them in bunches."""

    def __init__(self, *, linger_s: float = LINGER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._linger_s = linger_s
        self._clock = clock
        self._items: deque[object] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._urgent = False  # a command put with `put` is queued
        self._lingering_since: float | None = None  # when the oldest command put with `put_lingering` was put

    def put(self, item: object) -> None:
        """Queue `item` and wake the reader now."""
        with self._ready:
            self._items.append(item)
            self._urgent = True
            self._ready.notify()

    def put_lingering(self, item: object) -> None:
        """Queue `item`; the reader may leave it (and what follows it) queued for up to `linger_s`."""
        with self._ready:
            self._items.append(item)
            if self._lingering_since is None:
                self._lingering_since = self._clock()
                # A reader asleep until its own deadline (or for ever) must learn when this linger ends.
                self._ready.notify()

    def take(self, *, deadline: float | None) -> list[object]:
        """Every queued command in order, once `wakes` says so (`deadline` is monotonic); [] if none came."""
        with self._ready:
            while True:
                now = self._clock()
                lingering_since = self._lingering_since
                if wakes(
                    urgent=self._urgent, lingering_since=lingering_since, now=now,
                    linger_s=self._linger_s, deadline=deadline,
                ):  # fmt: skip
                    break
                until = next_wake(lingering_since=lingering_since, linger_s=self._linger_s, deadline=deadline)
                self._ready.wait(None if until is None else until - now)
            items = list(self._items)
            self._items.clear()
            self._urgent = False
            self._lingering_since = None
            return items

    def empty(self) -> bool:
        """Whether nothing is queued, lingering commands included."""
        with self._ready:
            return not self._items
