"""meshcontract.signing and meshcontract.jointoken: what a forged, altered or misdirected message looks like."""

from __future__ import annotations

import pytest

from meshcontract import jointoken
from meshcontract.errors import ContractError
from meshcontract.messages import MembershipDelta, MembershipSnapshot
from meshcontract.signing import SignatureError, Signer, Verifier, decode_public_key, signed_bytes

SIGNER = Signer.generate()
OTHER = Signer.generate()


def snapshot(**overrides: object) -> MembershipSnapshot:
    return MembershipSnapshot(**{"mesh": "m", "revision": 4, "members": [], "published_at": 1.0, **overrides})


def signed(message, signer: Signer = SIGNER, *, kind: str = "snapshot", mesh: str = "m"):
    return message.model_copy(update={"sig": signer.sign(message, kind=kind, mesh=mesh)})


def test_a_signed_message_verifies() -> None:
    Verifier(SIGNER.public_key).verify(signed(snapshot()), kind="snapshot", mesh="m")


@pytest.mark.parametrize(
    ("message", "kind", "mesh", "reason"),
    [
        pytest.param(snapshot(), "snapshot", "m", "unsigned", id="unsigned"),
        pytest.param(signed(snapshot(), OTHER), "snapshot", "m", "bad signature", id="another key"),
        pytest.param(
            signed(snapshot()).model_copy(update={"revision": 99}), "snapshot", "m", "bad signature",
            id="altered after signing",
        ),
        pytest.param(signed(snapshot()), "delta", "m", "bad signature", id="signed as another kind"),
        pytest.param(signed(snapshot()), "snapshot", "other", "bad signature", id="signed for another mesh"),
        pytest.param(snapshot(sig="not base64!"), "snapshot", "m", "not base64", id="garbage signature"),
    ],
)
def test_verification_refuses(message, kind: str, mesh: str, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        Verifier(SIGNER.public_key).verify(message, kind=kind, mesh=mesh)


def test_signature_covers_everything_but_sig() -> None:
    a = snapshot()
    assert signed_bytes(a, kind="snapshot", mesh="m") == signed_bytes(signed(a), kind="snapshot", mesh="m")
    d = MembershipDelta(mesh="m", from_revision=1, to_revision=2, removals=["n1"], published_at=1.0)
    assert b'"removals":["n1"]' in signed_bytes(d, kind="delta", mesh="m")


def test_signer_round_trips_through_pem() -> None:
    again = Signer.from_pem(SIGNER.to_pem())
    assert again.public_key == SIGNER.public_key


@pytest.mark.parametrize("text", ["", "AAAA", "not base64!"])
def test_bad_public_keys(text: str) -> None:
    with pytest.raises(ContractError):
        decode_public_key(text)


PIN = "A" * 43


@pytest.mark.parametrize(
    ("text", "secret", "pin"),
    [
        (f"mvj_abcdefghijklmnopqrstuvwx.{PIN}", "mvj_abcdefghijklmnopqrstuvwx", PIN),
        ("mvj_abcdefghijklmnopqrstuvwx", "mvj_abcdefghijklmnopqrstuvwx", None),
        (f"  mvj_abc-def_ghijklmnopqrst.{PIN}\n", "mvj_abc-def_ghijklmnopqrst", PIN),
    ],
)
def test_join_token_parse(text: str, secret: str, pin: str | None) -> None:
    parsed = jointoken.parse(text)
    assert (parsed.secret, parsed.pin) == (secret, pin)
    assert "mvj_" not in repr(parsed), "the secret never shows in a repr (logs)"


@pytest.mark.parametrize(
    "text", ["", "token", "mvj_short", f"xyz_abcdefghijklmnopqrstuvwx.{PIN}", "mvj_abcdefghijklmnopqrstuvwx.short"]
)
def test_join_token_rejects(text: str) -> None:
    with pytest.raises(ContractError):
        jointoken.parse(text)
