"""Join tokens: what lets a new node into the mesh. Pure: no I/O, `now` and the secret are passed in.

Only a SHA-256 hash of a token is kept; its id is the first 12 hex digits of that hash, so `tokens list`
and `tokens revoke ID` never need the secret. A token is single-use unless created reusable; a reusable
token may still carry a use limit. Tokens gate only enrollment: a member re-registers authenticated by its own
broker credential and needs no token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from meshcontract.messages import ErrorCode
from registrar.errors import Refused

TOKEN_PREFIX = "mvj_"
ID_LEN = 12


def new_secret() -> str:
    """A fresh random token string (the only place randomness enters; callers pass it to `create`)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(24)


def token_hash(secret: str) -> str:
    """Hex SHA-256 of a token string."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A stored token: its hash, limits and how often it was used."""

    id: str
    hash: str
    created_at: float
    expires_at: float | None
    reusable: bool
    max_uses: int | None  # None: unlimited (reusable only); single-use tokens have 1
    uses: int = 0

    def exhausted(self) -> bool:
        return self.max_uses is not None and self.uses >= self.max_uses

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


Tokens = Mapping[str, JoinToken]  # id -> token

EMPTY: Tokens = MappingProxyType({})


def create(
    tokens: Tokens,
    *,
    secret: str,
    now: float,
    ttl_s: float | None = None,
    reusable: bool = False,
    max_uses: int | None = None,
) -> tuple[Tokens, JoinToken]:
    """Add a token for `secret`. Single-use unless `reusable`; `max_uses` limits a reusable token."""
    if ttl_s is not None and ttl_s <= 0:
        raise ValueError("ttl_s must be > 0")
    if max_uses is not None and max_uses < 1:
        raise ValueError("max_uses must be >= 1")
    if not reusable:
        max_uses = 1
    digest = token_hash(secret)
    token = JoinToken(
        id=digest[:ID_LEN],
        hash=digest,
        created_at=now,
        expires_at=None if ttl_s is None else now + ttl_s,
        reusable=reusable,
        max_uses=max_uses,
    )
    out = dict(tokens)
    out[token.id] = token
    return MappingProxyType(out), token


def check(tokens: Tokens, secret: str | None, *, now: float) -> JoinToken:
    """The token `secret` names if it may admit a node now; Refused with the exact reason otherwise."""
    if not secret:
        raise Refused(ErrorCode.INVALID_TOKEN, "a join token is required to join this mesh")
    digest = token_hash(secret)
    token = tokens.get(digest[:ID_LEN])
    if token is None or not hmac.compare_digest(token.hash, digest):
        raise Refused(ErrorCode.INVALID_TOKEN, "unknown join token")
    if token.expired(now):
        raise Refused(ErrorCode.TOKEN_EXPIRED, f"join token {token.id} expired")
    if token.exhausted():
        raise Refused(ErrorCode.TOKEN_USED, f"join token {token.id} was already used")
    return token


def redeem(tokens: Tokens, secret: str | None, *, now: float) -> tuple[Tokens, JoinToken]:
    """Check `secret` and count one use of it; returns the new tokens and the updated token."""
    token = check(tokens, secret, now=now)
    token = replace(token, uses=token.uses + 1)
    out = dict(tokens)
    out[token.id] = token
    return MappingProxyType(out), token


def revoke(tokens: Tokens, token_id: str) -> tuple[Tokens, bool]:
    """Remove the token with id `token_id`; returns the new tokens and whether one was removed."""
    if token_id not in tokens:
        return tokens, False
    return MappingProxyType({i: t for i, t in tokens.items() if i != token_id}), True
