"""Pure rules of the agent's control-plane session: epochs and retry backoff. No I/O here."""

from __future__ import annotations

import random


def next_epoch(persisted: int | None, *, now_ms: int) -> int:
    """The epoch of a new MQTT session: later than every earlier one, even if the clock went backwards.

    Wall-clock milliseconds keep epochs meaningful to people and roughly comparable across machines; the
    persisted value guarantees they never repeat or decrease on this node.
    """
    if persisted is None:
        return now_ms
    return max(persisted + 1, now_ms)


def backoff_delay(
    attempt: int, *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number `attempt` (0-based): exponential, capped, with "full jitter".

    Full jitter (uniform between half and all of the exponential value) spreads a fleet of agents that lost
    the same broker at the same moment, so they do not all reconnect in the same instant.
    """
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    pick = (rng or random).uniform(0.5, 1.0)
    return ceiling * pick
