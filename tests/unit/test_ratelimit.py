"""meshcontract.ratelimit: token buckets per source, bounded memory. Table-driven; no I/O."""

from __future__ import annotations

import pytest

from meshcontract.ratelimit import RateLimiter, RatePolicy


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        pytest.param([0, 0, 0], [True, True, False], id="burst of 2, the third waits"),
        pytest.param([0, 0, 0.5, 1.0], [True, True, False, True], id="one token per second refills"),
        pytest.param([0, 0, 10, 10, 10], [True, True, True, True, False], id="refill is capped at the burst"),
        pytest.param([5, 4, 4], [True, True, False], id="a clock going back refills nothing"),
    ],
)
def test_bucket(times: list[float], expected: list[bool]) -> None:
    limiter = RateLimiter(RatePolicy(rate_per_s=1.0, burst=2))
    assert [limiter.allow("a", now=t) for t in times] == expected


def test_sources_are_independent() -> None:
    limiter = RateLimiter(RatePolicy(rate_per_s=1.0, burst=1))
    assert limiter.allow("flooder", now=0)
    assert not limiter.allow("flooder", now=0)
    assert limiter.allow("innocent", now=0), "one source's flood costs another nothing"


def test_memory_is_bounded_oldest_forgotten_first() -> None:
    limiter = RateLimiter(RatePolicy(rate_per_s=0.001, burst=1, max_sources=3))
    for source in "abcd":
        assert limiter.allow(source, now=0)
    assert limiter.allow("a", now=0), "a was forgotten (oldest) and starts with a full bucket"
    assert not limiter.allow("d", now=0), "d is remembered"


def test_retry_after() -> None:
    limiter = RateLimiter(RatePolicy(rate_per_s=2.0, burst=1))
    assert limiter.allow("a", now=0)
    assert limiter.retry_after("a", now=0) == pytest.approx(0.5)
    assert limiter.retry_after("a", now=1) == 0.0


@pytest.mark.parametrize("kw", [dict(rate_per_s=0, burst=1), dict(rate_per_s=1, burst=0), dict(rate_per_s=1, burst=1, max_sources=0)])
def test_bad_policies(kw) -> None:
    with pytest.raises(ValueError):
        RatePolicy(**kw)
