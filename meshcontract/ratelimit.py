"""Per-source rate limits: a token bucket for each client address. Pure: no I/O here, `now` is passed in.

One node (or one attacker) flooding enrollments, registrations or wrong passwords must cost the others nothing:
each source address gets `burst` requests at once and `rate_per_s` after that. The table is bounded: the least
recently seen sources are forgotten first, so spoofed or many-address floods cannot grow it without limit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RatePolicy:
    """`burst` requests at once, then `rate_per_s`; at most `max_sources` sources remembered."""

    rate_per_s: float
    burst: float
    max_sources: int = 10_000

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1 or self.max_sources < 1:
            raise ValueError("rate_per_s > 0, burst >= 1 and max_sources >= 1")


class RateLimiter:
    """Token buckets by source. Not thread-safe: callers serialise (the HTTP server holds a lock)."""

    def __init__(self, policy: RatePolicy) -> None:
        self.policy = policy
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, at)

    def allow(self, source: str, *, now: float, cost: float = 1.0) -> bool:
        """Take `cost` tokens from `source`'s bucket if it has them; False (nothing taken) if not."""
        tokens, at = self._buckets.pop(source, (self.policy.burst, now))
        tokens = min(self.policy.burst, tokens + max(0.0, now - at) * self.policy.rate_per_s)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.policy.max_sources:
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(self, source: str, *, now: float, cost: float = 1.0) -> float:
        """Seconds until `source` may send a request of `cost` again (0 if it may now)."""
        tokens, at = self._buckets.get(source, (self.policy.burst, now))
        tokens = min(self.policy.burst, tokens + max(0.0, now - at) * self.policy.rate_per_s)
        return max(0.0, (cost - tokens) / self.policy.rate_per_s)
