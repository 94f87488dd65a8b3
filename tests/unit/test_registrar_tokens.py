"""Join tokens: creation, limits, expiry, revocation; only hashes stored."""

from __future__ import annotations

import pytest

from meshcontract.messages import ErrorCode
from registrar import tokens
from registrar.errors import Refused


def _make(**kw):
    return tokens.create(tokens.EMPTY, secret="s3cret-token", now=100.0, **kw)


def test_only_hash_is_kept():
    table, token = _make()
    assert "s3cret-token" not in repr(token)
    assert token.hash == tokens.token_hash("s3cret-token")
    assert token.id == token.hash[:12]
    assert table[token.id] is token


@pytest.mark.parametrize(
    ("kw", "uses_ok", "then"),
    [
        ({}, 1, ErrorCode.TOKEN_USED),  # single-use
        ({"reusable": True, "max_uses": 3}, 3, ErrorCode.TOKEN_USED),
        ({"reusable": True}, 10, None),  # unlimited
    ],
)
def test_use_limits(kw, uses_ok, then):
    table, _ = _make(**kw)
    for _ in range(uses_ok):
        table, _ = tokens.redeem(table, "s3cret-token", now=101)
    if then is None:
        tokens.check(table, "s3cret-token", now=101)
    else:
        with pytest.raises(Refused) as err:
            tokens.redeem(table, "s3cret-token", now=101)
        assert err.value.code is then


@pytest.mark.parametrize(
    ("secret", "now", "code"),
    [
        (None, 101, ErrorCode.INVALID_TOKEN),
        ("", 101, ErrorCode.INVALID_TOKEN),
        ("wrong", 101, ErrorCode.INVALID_TOKEN),
        ("s3cret-token", 159.9, None),
        ("s3cret-token", 160, ErrorCode.TOKEN_EXPIRED),
    ],
)
def test_check(secret, now, code):
    table, _ = _make(ttl_s=60)
    if code is None:
        assert tokens.check(table, secret, now=now).uses == 0
    else:
        with pytest.raises(Refused) as err:
            tokens.check(table, secret, now=now)
        assert err.value.code is code


def test_revoke():
    table, token = _make()
    table, found = tokens.revoke(table, token.id)
    assert found and not table
    assert tokens.revoke(table, token.id)[1] is False


@pytest.mark.parametrize("kw", [{"ttl_s": 0}, {"reusable": True, "max_uses": 0}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        _make(**kw)


def test_new_secret_is_random():
    assert tokens.new_secret() != tokens.new_secret()
    assert tokens.new_secret().startswith(tokens.TOKEN_PREFIX)
