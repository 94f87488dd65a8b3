"""Runs the window's history reads and writes on one thread, in order, so the GUI thread never waits on SQLite.

No Qt here: a job's outcome is handed to a callback in the worker thread; the window turns that callback into
a Qt signal, which Qt queues onto the GUI thread. One thread (not a pool) keeps jobs in the order they were
submitted, so a read submitted after a write sees it, and results reach the window in that same order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from desktop_chat.errors import ChatError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Job:
    run: Callable[[], Any]
    done: Callable[[Any], None] | None
    failed: Callable[[ChatError], None] | None


class HistoryJobs:
    """One worker thread running submitted jobs first in, first out. start() it; stop() drains and ends it."""

    def __init__(self, *, name: str = "chat-history") -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the worker thread; jobs submitted before this wait for it."""
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def submit(
        self,
        run: Callable[[], Any],
        *,
        done: Callable[[Any], None] | None = None,
        failed: Callable[[ChatError], None] | None = None,
    ) -> None:
        """Queue `run()`; then `done(result)` or, if it raised a ChatError, `failed(error)`, in the worker thread.

        Ignored once stop() was called: nobody is left to show the outcome.
        """
        if not self._stopped:
            self._queue.put(_Job(run, done, failed))

    def stop(self, *, timeout: float = 2.0) -> None:
        """Run what is already queued (a message being stored stays stored), then end the thread."""
        self._stopped = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                log.warning("history jobs still running after %.1f s; leaving them to finish", timeout)
            self._thread = None

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                result = job.run()
            except ChatError as exc:
                if job.failed is not None:
                    job.failed(exc)
                else:
                    log.warning("history job failed: %s", exc)
                continue
            except Exception:
                # The loop itself: a bug in one job must not leave the window without history for the rest of
                # the session, so it is logged with its traceback and the next job runs.
                log.exception("history job crashed")
                continue
            if job.done is not None:
                job.done(result)
