"""Every MQTT topic of the mesh, built and parsed here and nowhere else.

No I/O here. Layout (MQTT 3.1.1 compatible: replies go to a per-node topic, correlation ids live in payloads):

    meshvpn/v1/<mesh>/register/<node>   node -> registrar   RegisterRequest        QoS 1, not retained
    meshvpn/v1/<mesh>/reply/<node>      registrar -> node   RegisterReply          QoS 1, not retained
    meshvpn/v1/<mesh>/status/<node>     node (and its will) NodeStatus             QoS 1, retained
    meshvpn/v1/<mesh>/heartbeat/<node>  node -> registrar   Heartbeat              QoS 0, not retained
    meshvpn/v1/<mesh>/snapshot          registrar           MembershipSnapshot     QoS 1, retained (signed)
    meshvpn/v1/<mesh>/delta             registrar           MembershipDelta        QoS 1, not retained (signed)
    meshvpn/v1/<mesh>/members/<node>    registrar           MemberRecord           QoS 1, retained ("" = tombstone);
                                                            for observers: agents follow snapshot + delta
    meshvpn/v1/<mesh>/registrar         registrar (+ will)  RegistrarStatus        QoS 1, retained

The broker username of a node is its node id, so its rights can be written against the last topic level
(meshcontract.access; for Mosquitto, registrar.accounts turns them into dynamic security roles).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from meshcontract.errors import TopicError

ROOT = "meshvpn"
VERSION = "v1"

# Node ids and mesh names end up as topic levels and broker usernames: keep them to a safe alphabet so no
# wildcard (+ #), separator (/) or NUL can ever be smuggled into a topic.
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class Kind(StrEnum):
    """The last-but-one (or last) topic level: what a message on the topic is."""

    REGISTER = "register"
    REPLY = "reply"
    STATUS = "status"
    HEARTBEAT = "heartbeat"
    MEMBERS = "members"
    SNAPSHOT = "snapshot"
    DELTA = "delta"
    REGISTRAR = "registrar"


# Kinds whose topic ends in a node id.
PER_NODE = frozenset({Kind.REGISTER, Kind.REPLY, Kind.STATUS, Kind.HEARTBEAT, Kind.MEMBERS})


def is_valid_id(value: str) -> bool:
    """True if `value` may be used as a mesh name or node id (a single, wildcard-free topic level)."""
    # fullmatch: with match, `$` also matched before a trailing new line, so "n1\n" passed as a node id
    # (register/n1\n made the registrar's reply to it fail validation and raise; found by fuzzing).
    return bool(_ID_RE.fullmatch(value))


def check_id(value: str, what: str) -> str:
    """Return `value` if it is a valid id, else raise TopicError naming `what` it was meant to be."""
    if not is_valid_id(value):
        raise TopicError(f"invalid {what} {value!r}: must match {_ID_RE.pattern}")
    return value


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic: which mesh, what kind, and for per-node kinds which node."""

    mesh: str
    kind: Kind
    node: str | None = None

    def __str__(self) -> str:
        return build(self.mesh, self.kind, self.node)


def build(mesh: str, kind: Kind, node: str | None = None) -> str:
    """Build the topic string for `kind` in `mesh` (and `node`, required exactly for per-node kinds)."""
    check_id(mesh, "mesh name")
    if kind in PER_NODE:
        if node is None:
            raise TopicError(f"topic kind {kind} needs a node id")
        return f"{ROOT}/{VERSION}/{mesh}/{kind}/{check_id(node, 'node id')}"
    if node is not None:
        raise TopicError(f"topic kind {kind} takes no node id")
    return f"{ROOT}/{VERSION}/{mesh}/{kind}"


def parse(topic: str) -> Topic:
    """Parse a concrete topic string into a Topic, raising TopicError for anything not in the contract."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT or parts[1] != VERSION:
        raise TopicError(f"not a {ROOT}/{VERSION} topic: {topic!r}")
    mesh = parts[2]
    if not is_valid_id(mesh):
        raise TopicError(f"invalid mesh name in topic {topic!r}")
    try:
        kind = Kind(parts[3])
    except ValueError:
        raise TopicError(f"unknown topic kind {parts[3]!r} in {topic!r}") from None
    if kind in PER_NODE:
        if len(parts) != 5 or not is_valid_id(parts[4]):
            raise TopicError(f"topic {topic!r} must end in one valid node id")
        return Topic(mesh, kind, parts[4])
    if len(parts) != 4:
        raise TopicError(f"topic {topic!r} has extra levels")
    return Topic(mesh, kind)


def subscription(mesh: str, kind: Kind) -> str:
    """The subscription filter for every message of `kind` in `mesh` (`+` for the node level)."""
    check_id(mesh, "mesh name")
    if kind in PER_NODE:
        return f"{ROOT}/{VERSION}/{mesh}/{kind}/+"
    return f"{ROOT}/{VERSION}/{mesh}/{kind}"


def mesh_filter(mesh: str) -> str:
    """Subscription filter for everything in one mesh (observers, e.g. mosquitto_sub)."""
    return f"{ROOT}/{VERSION}/{check_id(mesh, 'mesh name')}/#"
