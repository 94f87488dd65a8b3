"""Waiting on a condition with a deadline: the one polling helper every test shares.

Tests never sleep a fixed time as proof; they poll a condition and fail naming what they waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], *, timeout: float = 15.0, what: str = "condition", interval: float = 0.02
) -> T:
    """Poll `condition` until it returns something truthy and return that; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(interval)


def seconds_until(
    condition: Callable[[], object], *, timeout: float, what: str, interval: float = 0.02
) -> float:
    """`wait_for`, returning how many seconds it took (for tests that report convergence times)."""
    start = time.monotonic()
    wait_for(condition, timeout=timeout, what=what, interval=interval)
    return time.monotonic() - start
