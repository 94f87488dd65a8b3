"""Resolving peers' host names in the background, so that reconcile only ever reads a cache.

A member may advertise a DNS name (`vpn.example.com:51820`). getaddrinfo can take seconds or hang, and neither
wireguard-go nor the kernel resolves names, so the reconcile pass asks `lookup(names)`: it answers at once from
the cache and starts lookups for names it does not know or whose answer is older than the TTL. A finished lookup
that changes an answer calls `on_change` (the agent wakes the reconcile loop).

Everything is bounded: at most `max_names` names are remembered (least recently asked for are forgotten first),
at most `max_threads` lookups run at once (more wait their turn), a lookup still running after `timeout_s`
counts as failed (getaddrinfo cannot be interrupted: its thread keeps its slot until it returns), and a failure
is remembered `negative_ttl_s` before it is tried again.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Lookup = Callable[[str], list[str]]


def system_lookup(name: str) -> list[str]:
    """The addresses of `name` from the system resolver, IPv4 first; OSError if it has none."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_DGRAM)
    except UnicodeError as exc:
        raise OSError(f"{name!r} is not a valid host name: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
    return sorted(addresses, key=lambda a: ":" in a)


@dataclass(frozen=True, slots=True)
class Resolutions:
    """What the cache knows about the names asked for: an address, or why the last lookup failed."""

    addresses: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Entry:
    address: str | None = None
    error: str | None = None
    at: float | None = None  # when the current answer was obtained (None: never answered)
    started: float | None = None  # when the running lookup started (None: none running)
    queued: bool = False


class NameResolver:
    """A bounded, cached, background resolver. Thread-safe; `close()` stops it from starting more lookups."""

    def __init__(
        self,
        *,
        lookup: Lookup = system_lookup,
        on_change: Callable[[], None] = lambda: None,
        max_names: int = 256,
        max_threads: int = 4,
        timeout_s: float = 5.0,
        ttl_s: float = 60.0,
        negative_ttl_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._on_change = on_change
        self._max_names = max_names
        self._max_threads = max_threads
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._waiting: deque[str] = deque()
        self._running = 0
        self._closed = False

    def lookup(self, names: Iterable[str]) -> Resolutions:
        """Cached answers for `names` (lowercased); starts lookups for the unknown and the expired. Never blocks
        on the network."""
        result = Resolutions()
        changed = False
        with self._lock:
            now = self._clock()
            for name in sorted({n.lower() for n in names}):
                entry = self._entry(name)
                if entry is None:
                    result.failed[name] = "too many host names to resolve"
                    continue
                if entry.started is not None and now - entry.started >= self._timeout_s and entry.error is None:
                    changed |= self._answer(name, entry, None, f"no answer within {self._timeout_s:g}s", now)
                if entry.address is not None:
                    result.addresses[name] = entry.address
                elif entry.error is not None:
                    result.failed[name] = entry.error
                if self._due(entry, now):
                    entry.queued = True
                    self._waiting.append(name)
            starts = self._starts()
        for name in starts:
            self._start(name)
        if changed:
            self._on_change()
        return result

    def close(self) -> None:
        """Start no more lookups (running ones finish in their daemon threads)."""
        with self._lock:
            self._closed = True
            self._waiting.clear()

    # -- internals (the lock is held where noted) -------------------------------------------------------
    def _entry(self, name: str) -> _Entry | None:
        """The entry of `name`, made if needed (lock held); None if the cache is full of names being looked up."""
        entry = self._entries.get(name)
        if entry is not None:
            self._entries.move_to_end(name)
            return entry
        while len(self._entries) >= self._max_names:
            victim = next((n for n, e in self._entries.items() if e.started is None and not e.queued), None)
            if victim is None:
                return None
            del self._entries[victim]
        entry = self._entries[name] = _Entry()
        return entry

    def _due(self, entry: _Entry, now: float) -> bool:
        if entry.started is not None or entry.queued:
            return False
        if entry.at is None:
            return True
        ttl = self._ttl_s if entry.error is None else self._negative_ttl_s
        return now - entry.at >= ttl

    def _starts(self) -> list[str]:
        """Names to start looking up now, within the thread bound (lock held)."""
        starts = []
        while self._waiting and self._running < self._max_threads and not self._closed:
            name = self._waiting.popleft()
            entry = self._entries.get(name)
            if entry is None or not entry.queued:
                continue
            entry.queued = False
            entry.started = self._clock()
            self._running += 1
            starts.append(name)
        return starts

    def _start(self, name: str) -> None:
        threading.Thread(target=self._resolve, args=(name,), name=f"resolve-{name[:40]}", daemon=True).start()

    def _resolve(self, name: str) -> None:
        address: str | None = None
        error: str | None = "lookup failed"
        try:
            addresses = self._lookup(name)
            address, error = (addresses[0], None) if addresses else (None, "no addresses")
        except OSError as exc:
            error = str(exc) or type(exc).__name__
        finally:
            # Also after an unexpected error (it propagates and is logged by threading): the slot is freed.
            with self._lock:
                self._running -= 1
                entry = self._entries.get(name)
                changed = False
                if entry is not None:
                    changed = self._answer(name, entry, address, error, self._clock())
                    entry.started = None
                starts = self._starts()
            for queued in starts:
                self._start(queued)
            if changed:
                self._on_change()

    def _answer(self, name: str, entry: _Entry, address: str | None, error: str | None, now: float) -> bool:
        """Record an answer (lock held); True if it is the first or the address changed. Logged then only."""
        first, previous = entry.at is None, entry.address
        entry.address, entry.error, entry.at = address, error, now
        if not first and previous == address:
            return False
        fields = {"event": "name_resolved" if address else "name_unresolved", "host": name}
        if address is not None:
            log.info("host name %s resolves to %s", name, address, extra=fields)
        else:
            log.info("host name %s does not resolve: %s", name, error, extra=fields)
        return True
