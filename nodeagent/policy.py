"""Pure rules of the agent's control-plane session: epochs, retry backoff, refusals. No I/O here.

Every decision the session shell makes about *what* to do next lives here as a function of its inputs, so it
can be tested by a table: which epoch a new connection gets, how long to wait before the next attempt, and
whether a refused registration is worth retrying.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meshcontract.messages import EnrollReply, ErrorCode, RegisterReply

# Refusals that no retry can fix; anything else (e.g. "internal") is retried with backoff.
FATAL_CODES = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.INVALID_TOKEN,
        ErrorCode.TOKEN_EXPIRED,
        ErrorCode.TOKEN_USED,
        ErrorCode.INVALID_KEY,
        ErrorCode.KEY_CONFLICT,
        ErrorCode.KEY_REVOKED,
        ErrorCode.NOT_ENROLLED,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.POOL_EXHAUSTED,
    }
)

# Registration retries back off up to this; a registrar coming online cuts the wait short.
REGISTER_RETRY_BASE_S = 1.0
REGISTER_RETRY_CAP_S = 10.0
# Without a registration we do not know the mesh's TTL yet: reconnect at least this often.
RECONNECT_CAP_UNREGISTERED_S = 30.0


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
    """Seconds to wait before retry number `attempt` (0-based): exponential, capped, with "equal jitter".

    Equal jitter (uniform between half and all of the exponential value) spreads a fleet of agents that lost
    the same broker at the same moment, so they do not all reconnect in the same instant, while still waiting
    at least half the backoff: unlike full jitter (uniform from zero) it never turns into a tight retry loop.
    """
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    pick = (rng or random).uniform(0.5, 1.0)
    return ceiling * pick


def reconnect_cap(heartbeat_ttl_s: float | None) -> float:
    """Longest wait between reconnect attempts: half the heartbeat TTL (once known), between 1 and 30 s.

    After an outage the registrar waits about one TTL (its grace period) before it declares silent nodes
    unreachable; an agent still sleeping in a long backoff when the broker returns would be removed from every
    peer although nothing is wrong with it. Jitter still spreads a fleet within that window.
    """
    if heartbeat_ttl_s is None:
        return RECONNECT_CAP_UNREGISTERED_S
    return min(RECONNECT_CAP_UNREGISTERED_S, max(1.0, heartbeat_ttl_s / 2))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with the answer (or silence) after a RegisterRequest."""

    action: str  # "registered" | "fatal" | "retry"
    code: str | None = None
    reason: str = ""


def judge_reply(reply: RegisterReply | None, *, timeout_s: float) -> Verdict:
    """Registered, refused for good, or worth another try (no answer, or a refusal a retry can fix)."""
    if reply is None:
        return Verdict("retry", None, f"no reply within {timeout_s}s (registrar down?)")
    if reply.ok:
        return Verdict("registered")
    code = reply.error.code if reply.error else ErrorCode.INTERNAL
    message = reply.error.message if reply.error else "no reason given"
    if code in FATAL_CODES:
        return Verdict("fatal", str(code), message)
    return Verdict("retry", str(code), f"refused for now ({code}: {message})")


def judge_enrollment(status: int, reply: EnrollReply) -> Verdict:
    """Enrolled, refused for good (a token or key problem no retry fixes), or worth another try (rate limited,
    the registrar's own trouble)."""
    if status == 200 and reply.ok:
        return Verdict("registered")
    code = reply.error.code if reply.error else ErrorCode.INTERNAL
    message = reply.error.message if reply.error else f"HTTP {status}, no reason given"
    if code in FATAL_CODES and status < 500:
        return Verdict("fatal", str(code), message)
    return Verdict("retry", str(code), f"refused for now ({code}: {message})")
