"""The session's pure rules (nodeagent.policy): epochs, backoff, reconnect cap, login order, refusals."""

from __future__ import annotations

import random

import pytest

from meshcontract.messages import ErrorCode, ErrorInfo, RegisterReply
from nodeagent.policy import backoff_delay, judge_reply, next_epoch, reconnect_cap


@pytest.mark.parametrize(
    ("persisted", "now_ms", "expected"),
    [
        pytest.param(None, 1_700_000_000_000, 1_700_000_000_000, id="first session: the clock"),
        pytest.param(1_600_000_000_000, 1_700_000_000_000, 1_700_000_000_000, id="clock ahead of persisted"),
        pytest.param(1_700_000_000_000, 1_700_000_000_000, 1_700_000_000_001, id="same millisecond: +1"),
        pytest.param(1_800_000_000_000, 1_700_000_000_000, 1_800_000_000_001, id="clock went backwards"),
    ],
)
def test_next_epoch(persisted: int | None, now_ms: int, expected: int) -> None:
    assert next_epoch(persisted, now_ms=now_ms) == expected


@pytest.mark.parametrize(
    ("attempt", "low", "high"), [(0, 0.25, 0.5), (1, 0.5, 1.0), (3, 2.0, 4.0), (20, 15.0, 30.0)]
)
def test_backoff_bounds(attempt: int, low: float, high: float) -> None:
    rng = random.Random(attempt)
    for _ in range(50):
        assert low <= backoff_delay(attempt, rng=rng) <= high


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        pytest.param(None, 30.0, id="unregistered: TTL unknown"),
        pytest.param(15.0, 7.5, id="half the TTL"),
        pytest.param(0.5, 1.0, id="never below 1 s"),
        pytest.param(600.0, 30.0, id="never above 30 s"),
    ],
)
def test_reconnect_cap(ttl: float | None, expected: float) -> None:
    assert reconnect_cap(ttl) == expected


def _refusal(code: ErrorCode) -> RegisterReply:
    return RegisterReply(
        request_id="r1234567", ok=False, node_id="n1", error=ErrorInfo(code=code, message="because")
    )


@pytest.mark.parametrize(
    ("reply", "action", "code"),
    [
        pytest.param(None, "retry", None, id="no answer: retry"),
        pytest.param(RegisterReply(request_id="r1234567", ok=True, node_id="n1"), "registered", None, id="ok"),
        pytest.param(_refusal(ErrorCode.INTERNAL), "retry", "internal", id="internal: retry"),
        *[
            pytest.param(_refusal(code), "fatal", str(code), id=f"{code}: fatal")
            for code in (
                ErrorCode.INVALID_REQUEST,
                ErrorCode.INVALID_TOKEN,
                ErrorCode.TOKEN_EXPIRED,
                ErrorCode.TOKEN_USED,
                ErrorCode.INVALID_KEY,
                ErrorCode.KEY_CONFLICT,
                ErrorCode.POOL_EXHAUSTED,
            )
        ],
    ],
)
def test_judge_reply(reply: RegisterReply | None, action: str, code: str | None) -> None:
    verdict = judge_reply(reply, timeout_s=5)
    assert (verdict.action, verdict.code) == (action, code)
    if action != "registered":
        assert verdict.reason, "a retry or refusal says why"


def test_every_error_code_is_judged() -> None:
    """A new ErrorCode must be classified on purpose: this fails until it is listed fatal or retried."""
    judged = {str(judge_reply(_refusal(code), timeout_s=1).code) for code in ErrorCode}
    assert judged == {str(c) for c in ErrorCode}
