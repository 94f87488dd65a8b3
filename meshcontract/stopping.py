"""Stopping a service on SIGTERM/SIGINT, shared by the long-running commands.

The handler only records the signal. Calling Event.set() from a Python signal handler can deadlock: the handler
runs in the main thread, possibly while that thread is inside the same Event's wait() holding its internal
lock. Instead the main thread sleeps in select() on a socket that the interpreter writes to the moment a
signal arrives (signal.set_wakeup_fd), so a stop is seen at once without polling fast.
"""

from __future__ import annotations

import select
import signal
import socket
import threading

POLL_S = 0.2  # how often a `stop` Event set by code (not a signal) is noticed without the wakeup socket


class StopSignals:
    """Records SIGTERM/SIGINT; `wait()` returns once one arrived or `stop` (set by code, e.g. a test) is set."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()
        self.received: int | None = None
        self._wakeup: socket.socket | None = None
        self._writer: socket.socket | None = None  # must stay open as long as we listen
        self._previous: dict[signal.Signals, object] = {}
        self._previous_wakeup_fd = -1

    def install(self) -> StopSignals:
        """Take over SIGTERM and SIGINT (main thread only: Python delivers signals there)."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup, self._writer = reader, writer
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Give SIGTERM and SIGINT back to their previous handlers and close the wakeup socket (tests, mostly)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._writer is not None:
            # The interpreter must stop writing to the socket before it is closed.
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._writer.close()
            self._writer = None
        if self._wakeup is not None:
            self._wakeup.close()
            self._wakeup = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.received = signum  # nothing else: no locks, no logging, no Event.set()

    @property
    def requested(self) -> bool:
        return self.received is not None or self.stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested (True) or `timeout` seconds pass (False)."""
        remaining = timeout
        # With the wakeup socket a signal ends select() at once: wake up rarely just to look at `stop`.
        poll = 1.0 if self._wakeup is not None else POLL_S
        while not self.requested:
            step = poll if remaining is None else min(poll, remaining)
            if step <= 0:
                return False
            if self._wakeup is not None:
                # Returns early when a signal arrives: its number is written to the socket before the handler runs.
                if select.select([self._wakeup], [], [], step)[0]:
                    try:
                        self._wakeup.recv(64)
                    except BlockingIOError:
                        pass
            else:
                self.stop.wait(step)
            if remaining is not None:
                remaining -= step
        return True
