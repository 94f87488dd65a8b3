"""The join token as a user handles it: the secret the registrar checks, plus the pin of the registrar's CA.

    mvj_<secret>.<pin>

The secret is what the registrar stores (hashed) and counts uses of. The pin, base64url of the SHA-256 of the
registrar's CA certificate, is how a new node knows it talks to the real registrar before it sends anything:
it fetches the CA, checks the pin, then enrolls over TLS verified against that CA (as `kubeadm join` pins a CA
hash). No I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshcontract.errors import ContractError

SECRET_PREFIX = "mvj_"
_SECRET_RE = re.compile(r"^mvj_[A-Za-z0-9_-]{16,128}$")
_PIN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True, slots=True)
class JoinTokenText:
    """A parsed join token: `secret` for the registrar, `pin` (None in a bare secret) for the agent."""

    secret: str
    pin: str | None

    def __str__(self) -> str:
        return self.secret if self.pin is None else f"{self.secret}.{self.pin}"

    def __repr__(self) -> str:
        return f"JoinTokenText(secret=<hidden>, pin={self.pin!r})"


def compose(secret: str, pin: str) -> str:
    """The token to hand to a user: `secret` with the CA `pin` appended."""
    return str(JoinTokenText(secret, pin))


def parse(text: str) -> JoinTokenText:
    """Split a join token into secret and pin; ContractError naming the part that is malformed."""
    text = text.strip()
    secret, dot, pin = text.partition(".")
    if not _SECRET_RE.match(secret):
        raise ContractError("join token is malformed: expected mvj_<secret>.<pin> as `tokens create` prints it")
    if not dot:
        return JoinTokenText(secret, None)
    if not _PIN_RE.match(pin):
        raise ContractError("join token's CA pin is malformed (43 base64url characters after the '.')")
    return JoinTokenText(secret, pin)
