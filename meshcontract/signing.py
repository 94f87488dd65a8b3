"""Ed25519 signatures over the canonical form of contract messages: what makes membership unforgeable.

The registrar signs every membership message and register reply it publishes; agents verify with the
registrar's public key, which they learn at enrollment over TLS pinned by the join token, and persist. Signing
uses the `cryptography` package, imported only by what signs (the registrar); verifying uses the libcrypto
that `ssl` has loaded (`wgctl.libcrypto`), so an agent never loads `cryptography` (~7 MiB of its memory). The
signed bytes are a domain label, the message's kind and mesh, and the message's canonical JSON without its
`sig` field, so a signature for one kind of message or one mesh is never valid for another. No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import TYPE_CHECKING

from pydantic import BaseModel

from meshcontract.errors import ContractError
from wgctl import libcrypto

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"meshvpn/v1 registrar signature\n"
SIG_FIELD = "sig"


class SignatureError(ContractError):
    """A message is unsigned, signed by another key, or altered since it was signed."""


def signed_bytes(message: BaseModel, *, kind: str, mesh: str) -> bytes:
    """The bytes a signature covers: domain, kind, mesh and the canonical JSON of everything but `sig`."""
    body = message.model_dump(mode="json", exclude={SIG_FIELD})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return b"%s%s\n%s\n%s" % (DOMAIN, kind.encode(), mesh.encode(), canonical)


class Signer:
    """Holds the registrar's private signing key (a `cryptography` key: only the registrar signs)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = encode_public_key(private_key.public_key())

    @classmethod
    def generate(cls) -> Signer:
        # cryptography is imported here and below, not at the top: agents import this module to verify.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> Signer:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ContractError("the signing key file does not hold an Ed25519 private key")
        return cls(key)

    def to_pem(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        return self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    def sign(self, message: BaseModel, *, kind: str, mesh: str) -> str:
        """The base64 signature of `message` (its `sig` field, if any, is not covered)."""
        return base64.b64encode(self._key.sign(signed_bytes(message, kind=kind, mesh=mesh))).decode()


def encode_public_key(key: Ed25519PublicKey) -> str:
    """A public key as the base64 of its 32 raw bytes (how it travels and is stored)."""
    return base64.b64encode(key.public_bytes_raw()).decode()


def decode_public_key(text: str) -> bytes:
    """The 32 raw bytes of the Ed25519 public key in `text` (base64); ContractError if it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ContractError(f"not an Ed25519 public key: {exc}") from None
    if len(raw) != libcrypto.KEY_LEN:
        raise ContractError(f"not an Ed25519 public key: {len(raw)} bytes, not {libcrypto.KEY_LEN}")
    return raw


def key_fingerprint(text: str) -> str:
    """A short, stable name for a public key in logs: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Verifier:
    """Checks signatures with the registrar's public key."""

    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        self._key = decode_public_key(public_key)
        libcrypto.require()  # a libcrypto without Ed25519 fails here, at start, not at the first message

    def verify(self, message: BaseModel, *, kind: str, mesh: str) -> None:
        """Return if `message.sig` is the registrar's signature over it; SignatureError saying why otherwise."""
        sig = getattr(message, SIG_FIELD, None)
        if not sig:
            raise SignatureError(f"unsigned {kind}")
        try:
            raw = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError(f"{kind}: signature is not base64") from None
        if not libcrypto.ed25519_verify(self._key, raw, signed_bytes(message, kind=kind, mesh=mesh)):
            raise SignatureError(
                f"{kind}: bad signature (not from registrar key {key_fingerprint(self.public_key)}, or altered)"
            )
