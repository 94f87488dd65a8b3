"""Who may publish and subscribe what on the broker, and the password-file format. No I/O here.

The rules are one table, GRANTS. Both brokers enforce it: the embedded one by calling `may_publish` /
`may_subscribe` / `may_receive`, Mosquitto through dynamic security roles built from the same table
(registrar.accounts). A node's broker username is its node id.

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
# Mosquitto's dynamic security admin (creates and deletes node accounts for the registrar). Not node-shaped
# because of the dot, so no node can ever be enrolled under it.
BROKER_ADMIN_USER = "meshvpn.admin"
# Accounts that are not nodes. Node ids must never take these names: a node enrolled as "observer" would own
# the observer's broker account (found by an attacker's test; enforced by `check_node_id` everywhere).
RESERVED = frozenset({REGISTRAR_USER, OBSERVER_USER, BROKER_ADMIN_USER, "admin", "root", "meshvpn"})

_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
_SALT_BYTES = 12


class Role(StrEnum):
    """What a broker username may do."""

    REGISTRAR = "registrar"  # everything under meshvpn/
    OBSERVER = "observer"  # read membership, status and heartbeats (operators, mosquitto_sub); nothing that logs in
    NODE = "node"  # its own register/status/heartbeat; read membership and its own replies


def is_node_id(value: str | None) -> bool:
    """True if `value` may be a node id: a valid topic level and not a reserved account name."""
    return bool(value) and topics.is_valid_id(value) and value not in RESERVED  # type: ignore[arg-type]


def check_node_id(value: str) -> str:
    """Return `value` if it may be a node id; ValueError saying why not."""
    if value in RESERVED:
        raise ValueError(f"{value!r} is a reserved account name, not a node id")
    if not topics.is_valid_id(value):
        raise ValueError(f"node id {value!r} must be lowercase letters, digits, '-' or '_'")
    return value


def role_of(username: str | None) -> Role | None:
    """The role of a broker username; None (no access) for anonymous, invalid or other reserved names."""
    if username == REGISTRAR_USER:
        return Role.REGISTRAR
    if username == OBSERVER_USER:
        return Role.OBSERVER
    if is_node_id(username):
        return Role.NODE
    return None


@dataclass(frozen=True, slots=True)
class Grant:
    """One right on one topic family: publish (also as a will) or read (subscribe and receive).

    `own` restricts a per-node family to the topic of the username itself (a node's own status, its replies).
    """

    kind: Kind
    publish: bool = False
    read: bool = False
    own: bool = False


# The whole access policy. Both brokers enforce exactly this: the embedded one through may_publish,
# may_subscribe and may_receive below, Mosquitto through dynamic security roles built from these grants.
GRANTS: dict[Role, tuple[Grant, ...]] = {
    Role.REGISTRAR: tuple(Grant(k, publish=True, read=True) for k in Kind),
    Role.OBSERVER: (
        Grant(Kind.STATUS, read=True),
        Grant(Kind.HEARTBEAT, read=True),
        Grant(Kind.MEMBERS, read=True),
        Grant(Kind.SNAPSHOT, read=True),
        Grant(Kind.DELTA, read=True),
        Grant(Kind.REGISTRAR, read=True),
    ),
    Role.NODE: (
        Grant(Kind.REGISTER, publish=True, own=True),
        Grant(Kind.STATUS, publish=True, own=True),
        Grant(Kind.HEARTBEAT, publish=True, own=True),
        Grant(Kind.REPLY, read=True, own=True),
        Grant(Kind.SNAPSHOT, read=True),
        Grant(Kind.DELTA, read=True),
        Grant(Kind.REGISTRAR, read=True),
    ),
}


def _granted(username: str | None, topic: topics.Topic, *, publish: bool, mesh: str | None) -> bool:
    role = role_of(username)
    if role is None or (mesh is not None and topic.mesh != mesh):
        return False
    for grant in GRANTS[role]:
        if grant.kind is not topic.kind or not (grant.publish if publish else grant.read):
            continue
        if not grant.own or topic.node == username:
            return True
    return False


def _registrar_topic(topic: str, mesh: str | None) -> bool:
    # The registrar owns the tree (within its mesh when the broker serves one): anything under meshvpn/.
    parts = topic.split("/")
    return parts[0] == topics.ROOT and len(parts) > 1 and (mesh is None or len(parts) < 3 or parts[2] == mesh)


def may_publish(username: str | None, topic: str, *, mesh: str | None = None) -> bool:
    """True if `username` may publish (or set a will) on the concrete `topic` (of `mesh`, when bound to one)."""
    if role_of(username) is Role.REGISTRAR:
        return _registrar_topic(topic, mesh)
    try:
        parsed = topics.parse(topic)
    except ContractError:
        return False
    return _granted(username, parsed, publish=True, mesh=mesh)


def may_receive(username: str | None, topic: str, *, mesh: str | None = None) -> bool:
    """True if `username` may be sent a message published on concrete `topic` (retained delivery, too)."""
    if role_of(username) is Role.REGISTRAR:
        return _registrar_topic(topic, mesh)
    try:
        parsed = topics.parse(topic)
    except ContractError:
        return False
    return _granted(username, parsed, publish=False, mesh=mesh)


def may_subscribe(username: str | None, topic_filter: str, *, mesh: str | None = None) -> bool:
    """True if `username` may subscribe to `topic_filter` (which may hold + and # wildcards).

    The registrar and the observer may subscribe to any filter in the tree (the observer then receives only
    what may_receive allows, retained messages included). A node may subscribe only to exactly the topics it
    may read: no wildcard except the node level of a family it may read from every node.
    """
    role = role_of(username)
    if role is None:
        return False
    parts = topic_filter.split("/")
    if parts[0] != topics.ROOT:
        return False
    if role in (Role.REGISTRAR, Role.OBSERVER):
        if mesh is not None and len(parts) > 2 and parts[2] not in (mesh, "+", "#"):
            return False
        return topic_filter == f"{topics.ROOT}/#" or len(parts) >= 2
    if "#" in topic_filter:
        return False
    if len(parts) == 5 and parts[4] == "+":
        if not topics.is_valid_id(parts[2]) or (mesh is not None and parts[2] != mesh):
            return False
        try:
            kind = Kind(parts[3])
        except ValueError:
            return False
        return any(g.kind is kind and g.read and not g.own for g in GRANTS[role])
    if "+" in topic_filter:
        return False
    return may_receive(username, topic_filter, mesh=mesh)


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
