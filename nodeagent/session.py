"""Pure rules of the agent's control-plane session: epochs, retry backoff, which credential to log in with.
No I/O here."""

from __future__ import annotations

import random
from enum import Enum


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


class Login(Enum):
    """Which broker credential a connection attempt uses (logged by name, never the secret)."""

    CONFIGURED = "the configured broker.password"
    OWN = "the node's own broker password"
    TOKEN = "the join token"


def login_order(*, configured: bool, own_accepted: bool, has_token: bool) -> tuple[Login, ...]:
    """The credentials to try, in order; after a refused CONNECT the agent moves on to the next (cyclically).

    A configured password (pre-provisioned, e.g. on Mosquitto) is the only one. Otherwise the own password is
    tried first once a registrar has accepted it, the join token first before that. Either way the other
    one follows: a refused own password while the node has no entry means the registrar never stored it (use
    the token), a refused token means an entry exists — the registrar stored our password but its reply or
    our record of it was lost (use the own password).
    """
    if configured:
        return (Login.CONFIGURED,)
    if not has_token:
        return (Login.OWN,)
    return (Login.OWN, Login.TOKEN) if own_accepted else (Login.TOKEN, Login.OWN)
