"""Who may publish and subscribe what on the broker, and the password-file format. No I/O here.

Both brokers enforce the same rules: the embedded one by calling `may_publish` / `may_subscribe`, Mosquitto by
the ACL file in broker/mosquitto/acl.conf, written from the same rules with %u patterns. A node's broker
username is its node id.

Password file: Mosquitto's own format (`user:$7$iterations$salt$hash`, PBKDF2-HMAC-SHA512), so one file
serves both brokers and `mosquitto_passwd` can manage it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from enum import StrEnum

from meshcontract import topics
from meshcontract.errors import ContractError
from meshcontract.topics import Kind

REGISTRAR_USER = "registrar"
OBSERVER_USER = "observer"
# Password prefix a node may use before it has credentials of its own: the rest is a join token, checked by
# the embedded broker against the registrar's token store. Such a connection gets the node's normal ACL.
JOIN_PASSWORD_PREFIX = "join:"

_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
_SALT_BYTES = 12


class Role(StrEnum):
    """What a broker username may do."""

    REGISTRAR = "registrar"  # everything under meshvpn/
    OBSERVER = "observer"  # read everything under meshvpn/ (operators, mosquitto_sub)
    NODE = "node"  # its own register/status/heartbeat; read membership and its own replies


def role_of(username: str | None) -> Role | None:
    """The role of a broker username; None (no access) for anonymous or invalid names."""
    if username == REGISTRAR_USER:
        return Role.REGISTRAR
    if username == OBSERVER_USER:
        return Role.OBSERVER
    if username and topics.is_valid_id(username):
        return Role.NODE
    return None


_NODE_PUBLISH = frozenset({Kind.REGISTER, Kind.STATUS, Kind.HEARTBEAT})
_NODE_READ_ANY = frozenset({Kind.MEMBERS, Kind.ROSTER, Kind.REGISTRAR})


def may_publish(username: str | None, topic: str) -> bool:
    """True if `username` may publish (or set a will) on the concrete `topic`."""
    role = role_of(username)
    if role is Role.REGISTRAR:
        return topic.startswith(f"{topics.ROOT}/")
    if role is not Role.NODE:
        return False
    try:
        parsed = topics.parse(topic)
    except ContractError:
        return False
    return parsed.kind in _NODE_PUBLISH and parsed.node == username


def may_subscribe(username: str | None, topic_filter: str) -> bool:
    """True if `username` may subscribe to `topic_filter` (which may hold + and # wildcards)."""
    role = role_of(username)
    if role in (Role.REGISTRAR, Role.OBSERVER):
        return topic_filter == f"{topics.ROOT}/#" or topic_filter.startswith(f"{topics.ROOT}/")
    if role is not Role.NODE:
        return False
    parts = topic_filter.split("/")
    if len(parts) < 4 or parts[0] != topics.ROOT or parts[1] != topics.VERSION or not topics.is_valid_id(parts[2]):
        return False
    kind = parts[3]
    if kind in _NODE_READ_ANY and len(parts) == 4 and kind != Kind.MEMBERS:
        return True
    if kind == Kind.MEMBERS and len(parts) == 5 and (parts[4] == "+" or topics.is_valid_id(parts[4])):
        return True
    return kind == Kind.REPLY and len(parts) == 5 and parts[4] == username


def may_receive(username: str | None, topic: str) -> bool:
    """True if `username` may be sent a message published on concrete `topic` (retained delivery, too)."""
    role = role_of(username)
    if role in (Role.REGISTRAR, Role.OBSERVER):
        return topic.startswith(f"{topics.ROOT}/")
    if role is not Role.NODE:
        return False
    try:
        parsed = topics.parse(topic)
    except ContractError:
        return False
    if parsed.kind in _NODE_READ_ANY:
        return True
    return parsed.kind is Kind.REPLY and parsed.node == username


@dataclass(frozen=True, slots=True)
class PasswordEntry:
    """One line of the password file."""

    username: str
    hashed: str

    def line(self) -> str:
        return f"{self.username}:{self.hashed}"


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Hash `password` the way mosquitto_passwd does (`$7$101$salt$hash`)."""
    salt = salt if salt is not None else os.urandom(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return f"$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Check `password` against a `$7$` (PBKDF2-SHA512) or `$6$` (salted SHA512) Mosquitto hash."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
            return hmac.compare_digest(got, want)
        if len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            return hmac.compare_digest(hashlib.sha512(password.encode() + salt).digest(), want)
    except ValueError:
        return False
    return False


def parse_password_file(text: str) -> dict[str, str]:
    """username -> hash from a password file's text; blank lines and # comments are skipped."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        user, hashed = line.split(":", 1)
        entries[user] = hashed
    return entries


def render_password_file(entries: dict[str, str]) -> str:
    """The text of a password file holding `entries`, sorted for stable diffs."""
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))
