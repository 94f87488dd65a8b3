"""Every MQTT payload of the mesh, one pydantic model each. No I/O here.

All models are strict (no type coercion), forbid unknown fields, carry the schema version `v`, and bound
every string and list so a hostile payload cannot make a service allocate without limit. `decode` is the
single entry point for bytes from the wire; `encode` and `canonical_json` the way out. Canonical JSON
(sorted keys, no whitespace) is what a future registrar signature (Ed25519) will cover.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshcontract.errors import PayloadError
from meshcontract.topics import is_valid_id

SCHEMA_VERSION = 1

# Largest payload accepted on any per-node topic. Roster payloads grow with the mesh and get their own limit.
MAX_PAYLOAD = 16 * 1024
MAX_ROSTER_PAYLOAD = 4 * 1024 * 1024

NodeId = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
RequestId = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
# Display alias only: printable, bounded. Never used for addressing.
NodeName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[^\x00-\x1f\x7f]+$")]
Epoch = Annotated[int, Field(ge=0, lt=2**63)]
Timestamp = Annotated[float, Field(ge=0)]
Port = Annotated[int, Field(ge=1, le=65535)]


def check_wg_key(value: str) -> str:
    """Validate a WireGuard key in its usual base64 form (32 bytes); return it unchanged."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"must decode to 32 bytes, got {len(raw)}")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Message(_Model):
    """Base of every wire message: carries the schema version."""

    v: Literal[1] = SCHEMA_VERSION


class Endpoint(_Model):
    """An underlay address where a node's WireGuard listens: an IP literal or DNS name and a UDP port."""

    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")
    port: Port

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class MemberState(StrEnum):
    """Liveness of a member as decided by the registrar (the only authority)."""

    ACTIVE = "active"  # online and heartbeating within the TTL: peers keep a tunnel to it
    UNREACHABLE = "unreachable"  # will, explicit offline or missed TTL: peers drop its tunnel, its IP stays reserved


class ErrorCode(StrEnum):
    """Why a request was refused. Stable strings: agents branch on them."""

    INVALID_REQUEST = "invalid_request"
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_USED = "token_used"
    INVALID_KEY = "invalid_key"
    KEY_CONFLICT = "key_conflict"
    POOL_EXHAUSTED = "pool_exhausted"
    INTERNAL = "internal"


class ErrorInfo(_Model):
    """A machine-readable code and a human sentence."""

    code: ErrorCode
    message: str = Field(max_length=500)


class MeshSettings(_Model):
    """Mesh-wide settings the registrar hands every node at registration."""

    mesh: NodeId
    network: str = Field(max_length=64, description="the mesh prefix, e.g. 100.96.0.0/16")
    heartbeat_interval_s: float = Field(gt=0, le=3600)
    heartbeat_ttl_s: float = Field(gt=0, le=86400)
    persistent_keepalive_s: int = Field(ge=0, le=65535)
    mtu: int = Field(ge=576, le=9000)

    @field_validator("network")
    @classmethod
    def _network(cls, value: str) -> str:
        ipaddress.ip_network(value, strict=True)
        return value


class RegisterRequest(Message):
    """Published by a node on register/<node> (QoS 1, not retained) to join or re-join the mesh.

    Idempotent: the same public key always gets the same node id and mesh IP. `epoch` starts a new
    control-plane session: status and heartbeats from older epochs are ignored from then on.

    `broker_password` is the node's own broker password, generated and stored (0600) by the agent before it
    first connects; unset when the node uses a configured (pre-provisioned) password. The registrar stores its
    hash in the broker's password file only if the node id has no entry yet (the sender is logged in as that
    node id, so it proved the existing password or, while there is none, a join token); it never replaces an
    existing entry, and never retains the clear text. Requests are not retained either.
    """

    request_id: RequestId
    node_id: NodeId
    name: NodeName
    public_key: str = Field(max_length=64)
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=8)
    listen_port: Port
    join_token: str | None = Field(default=None, max_length=256)
    epoch: Epoch
    broker_password: str | None = Field(default=None, min_length=16, max_length=128)

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_wg_key(value)


class RegisterReply(Message):
    """Published by the registrar on reply/<node> (QoS 1, not retained), answering one RegisterRequest.

    `broker_password` is legacy: a registrar sets it only for a node that sent no password of its own in its
    first RegisterRequest (an older agent) and has no password entry yet; that agent stores it (0600). A lost
    reply of that kind still locks such an old agent out; current agents send their own password instead.
    """

    request_id: RequestId
    ok: bool
    node_id: NodeId
    mesh_ip: str | None = None
    prefix_len: int | None = Field(default=None, ge=0, le=128)
    settings: MeshSettings | None = None
    broker_password: str | None = Field(default=None, max_length=128)
    error: ErrorInfo | None = None


class NodeStatus(Message):
    """Published by a node on status/<node> (QoS 1, retained), and set as its last-will with state offline.

    The registrar treats it as a hint: it only counts if `epoch` is the node's current session epoch or newer.
    `last_will` is true only in the will: a broker that shuts down publishes every client's will, so the
    registrar may take back an offline status that is a will, never one the node said itself (a goodbye).
    """

    node_id: NodeId
    state: Literal["online", "offline"]
    epoch: Epoch
    at: Timestamp
    last_will: bool = False


class Heartbeat(Message):
    """Published by a node on heartbeat/<node> (QoS 0, not retained) every heartbeat interval."""

    node_id: NodeId
    epoch: Epoch
    seq: int = Field(ge=0, lt=2**63)
    sent_at: Timestamp


class MemberRecord(Message):
    """Published by the registrar on members/<node> (QoS 1, retained); an empty payload is a tombstone.

    `revision` is the roster revision at which this record last changed; agents ignore a record older than
    the one they hold.
    """

    node_id: NodeId
    name: NodeName
    mesh_ip: str = Field(max_length=45)
    public_key: str = Field(max_length=64)
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=8)
    listen_port: Port
    state: MemberState
    revision: int = Field(ge=0)
    updated_at: Timestamp

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_wg_key(value)

    @field_validator("mesh_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class RosterEntry(_Model):
    """One member in the roster: its id and the revision of its current record."""

    node_id: NodeId
    revision: int = Field(ge=0)


class Roster(Message):
    """Published by the registrar on roster (QoS 1, retained): the complete member list at `revision`.

    An agent's view is complete when it holds, for every entry, a member record at least that new; only a
    complete view may remove peers. `revision` only grows (it survives registrar restarts).
    """

    mesh: NodeId
    revision: int = Field(ge=0)
    members: list[RosterEntry] = Field(max_length=100_000)
    published_at: Timestamp


class RegistrarStatus(Message):
    """Published by the registrar on registrar (QoS 1, retained), and its last-will with state offline."""

    state: Literal["online", "offline"]
    instance: str = Field(min_length=1, max_length=64)
    started_at: Timestamp
    at: Timestamp


M = TypeVar("M", bound=BaseModel)


def decode(model: type[M], payload: bytes, *, max_size: int = MAX_PAYLOAD) -> M:
    """Decode JSON `payload` into `model`, raising PayloadError with a readable reason on any problem."""
    if len(payload) > max_size:
        raise PayloadError(f"{model.__name__}: payload of {len(payload)} bytes exceeds {max_size}")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"{model.__name__}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError(f"{model.__name__}: expected a JSON object, got {type(data).__name__}")
    if data.get("v") not in (None, SCHEMA_VERSION) and "v" in model.model_fields:
        raise PayloadError(f"{model.__name__}: unsupported schema version {data.get('v')!r}")
    try:
        # JSON mode: strict models still accept JSON numbers/strings for their declared types.
        return model.model_validate_json(payload)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
        raise PayloadError(f"{model.__name__}: {reasons}") from None


def encode(message: BaseModel) -> bytes:
    """Serialise a message for the wire (compact JSON, readable in mosquitto_sub)."""
    return message.model_dump_json().encode()


def canonical_json(message: BaseModel) -> bytes:
    """Canonical bytes of a message: sorted keys, no whitespace. Stable across processes; what gets signed."""
    return json.dumps(message.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def node_id_ok(value: str) -> bool:
    """True if `value` is a valid node id (same rule as topic levels)."""
    return is_valid_id(value)
