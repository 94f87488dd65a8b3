"""wgctl.libcrypto against `cryptography`: the same answers on random and hostile input, or a binding is wrong."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from wgctl import libcrypto
from wgctl.errors import WireGuardError

ROOT = Path(__file__).resolve().parents[2]
RNG = random.Random(15)  # fixed: a failure names the same inputs every run
L = 2**252 + 27742317777372353535851937790883648493  # the order of Ed25519's base point

# Encodings of the points of small order (1, 2, 4 and 8) and of y values out of range, as public keys or R.
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",  # identity
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4, sign bit set
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p: not canonical
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p + 1
    "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
]


def reference_verify(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def queue_is_empty() -> bool:
    return libcrypto._lib().err_get_error() == 0


# --- X25519 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "private",
    [bytes(32), b"\xff" * 32, bytes(range(32)), *(RNG.randbytes(32) for _ in range(300))],
    ids=lambda b: b.hex()[:12],
)
def test_x25519_public_key_matches_cryptography(private: bytes) -> None:
    expected = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    assert libcrypto.x25519_public_key(private) == expected


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_x25519_refuses_a_private_key_of_the_wrong_length(length: int) -> None:
    with pytest.raises(libcrypto.LibcryptoError, match="32 bytes"):
        libcrypto.x25519_public_key(bytes(length))


# --- Ed25519 ----------------------------------------------------------------------------------------------


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("seed", range(150))
def test_ed25519_verify_matches_cryptography(seed: int) -> None:
    rng = random.Random(seed)
    key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    public = key.public_key().public_bytes_raw()
    message = rng.randbytes(rng.choice([0, 1, 31, 64, 200, 5000]))
    signature = key.sign(message)
    other = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)).public_key().public_bytes_raw()
    cases = [
        (public, signature, message),  # genuine
        (other, signature, message),  # another key
        (public, _flip(signature, rng.randrange(512)), message),  # a bit of R or S
        (public, signature, message + b"\x00"),  # appended
        (public, signature[:63], message),
        (public, signature + b"\x00", message),
        (public, b"", message),
        (_flip(public, rng.randrange(256)), signature, message),  # a damaged key, maybe no point
    ]
    if message:
        cases.append((public, signature, _flip(message, rng.randrange(len(message) * 8))))
    for pub, sig, msg in cases:
        assert libcrypto.ed25519_verify(pub, sig, msg) is reference_verify(pub, sig, msg), (pub, sig, msg)
        assert queue_is_empty()
    assert libcrypto.ed25519_verify(public, signature, message) is True


def test_ed25519_refuses_s_not_reduced_mod_l() -> None:
    """The same signature with S + L is the same equation, but RFC 8032 says reject (malleability)."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    message = b"revision 7"
    signature = key.sign(message)
    s = int.from_bytes(signature[32:], "little") + L
    malleated = signature[:32] + s.to_bytes(32, "little")
    public = key.public_key().public_bytes_raw()
    assert reference_verify(public, malleated, message) is False
    assert libcrypto.ed25519_verify(public, malleated, message) is False
    assert queue_is_empty()


@pytest.mark.parametrize("public_hex", SMALL_ORDER)
@pytest.mark.parametrize("r_hex", [SMALL_ORDER[0], SMALL_ORDER[2], SMALL_ORDER[4], "00" * 32])
@pytest.mark.parametrize("s", [0, 1, L - 1])
def test_ed25519_small_order_and_odd_points_match_cryptography(public_hex: str, r_hex: str, s: int) -> None:
    public = bytes.fromhex(public_hex)
    signature = bytes.fromhex(r_hex) + s.to_bytes(32, "little")
    for message in (b"", b"meshvpn"):
        expected = reference_verify(public, signature, message)
        assert libcrypto.ed25519_verify(public, signature, message) is expected
        assert queue_is_empty()


@pytest.mark.parametrize("length", [0, 31, 33])
def test_ed25519_refuses_a_public_key_of_the_wrong_length(length: int) -> None:
    with pytest.raises(libcrypto.LibcryptoError, match="32 bytes"):
        libcrypto.ed25519_verify(bytes(length), bytes(64), b"m")


# --- loading ----------------------------------------------------------------------------------------------


def test_require_names_the_library_of_the_ssl_module() -> None:
    import _ssl

    assert libcrypto.require() == _ssl.__file__


def test_a_library_without_the_raw_key_functions_is_refused_with_the_reason() -> None:
    with pytest.raises(libcrypto.LibcryptoError) as caught:
        libcrypto._load(["libc.so.6", "/nonexistent/libcrypto.so"])
    text = str(caught.value)
    assert "OpenSSL >= 1.1.1" in text
    assert "libc.so.6: lacks" in text and "EVP_PKEY_new_raw_private_key" in text
    assert "/nonexistent/libcrypto.so" in text
    assert isinstance(caught.value, WireGuardError)  # the agent's start reports it like any wgctl error


def test_the_agent_never_imports_cryptography() -> None:
    """The point of wgctl.libcrypto: the agent's entry point and everything it runs stay free of it."""
    code = (
        "import sys, nodeagent.cli, nodeagent.agent, nodeagent.enrollment, wgctl.backends, wgctl.userspace\n"
        "from wgctl import keys\n"
        "from meshcontract.signing import Verifier\n"
        "keys.public_key(keys.generate_private_key())\n"
        "Verifier('A' * 43 + '=')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
