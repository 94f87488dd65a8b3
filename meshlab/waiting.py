"""Waiting on a condition with a deadline: the lab's one polling helper, shaped like tests/polling.py's.

Nothing in the lab sleeps a fixed time as proof: it polls a condition and, at the deadline, fails naming what
it waited for. Unlike the tests' helper this one returns the seconds it took (the lab reports them).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from meshlab.errors import NotReadyError


def wait_for(condition: Callable[[], object], *, timeout: float, what: str, interval: float = 0.2) -> float:
    """Poll `condition` until it is truthy; the seconds it took, NotReadyError naming `what` at the deadline."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise NotReadyError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)
