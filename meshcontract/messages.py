"""Every payload of the mesh, one pydantic model each: MQTT messages and the enrollment exchange. No I/O here.

All models are strict (no type coercion), forbid unknown fields, carry the schema version `v`, and bound
every string and list so a hostile payload cannot make a service allocate without limit. `decode` is the
single entry point for bytes from the wire (it also refuses nesting deeper than any message has, so a hostile
payload cannot exhaust the parser's recursion); `encode` and `canonical_json` the way out. Membership
messages and register replies carry the registrar's Ed25519 signature over their canonical form
(meshcontract.signing).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import json
import re
import unicodedata
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from meshcontract.access import check_node_id
from meshcontract.errors import PayloadError
from meshcontract.topics import is_valid_id

SCHEMA_VERSION = 1

# Largest payload accepted on any per-node topic. Membership snapshots and deltas grow with the mesh and get
# their own limit (MAX_MEMBERS records of well under 1 KiB each).
MAX_PAYLOAD = 16 * 1024
MAX_MEMBERS = 65_536
MAX_MEMBERSHIP_PAYLOAD = 64 * 1024 * 1024
# A heartbeat names at most this many members it vouches for, and this many broken paths (it stays small).
MAX_VOUCHES = 64
MAX_BROKEN_PATHS = 128
# No message nests deeper than this; JSON nested deeper is refused before it is parsed.
MAX_DEPTH = 8


def _display_name(value: str) -> str:
    # Names are shown to people (meshctl, the chat), so characters that change how text around them looks are
    # refused: controls, bidi overrides and other format characters, private use, unassigned code points.
    value = unicodedata.normalize("NFC", value)
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"):
            raise ValueError(f"name contains a control or format character U+{ord(ch):04X}")
    if value != value.strip():
        raise ValueError("name has leading or trailing white space")
    return value


NodeId = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$"),
    AfterValidator(check_node_id),
]
RequestId = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
# Display alias only: printable, bounded. Never used for addressing.
NodeName = Annotated[str, Field(min_length=1, max_length=63), AfterValidator(_display_name)]
MeshName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Signature = Annotated[str, Field(max_length=128)]
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


class EndpointKind(StrEnum):
    """Where an endpoint candidate comes from; agents choose among a peer's candidates by kind."""

    LOCAL = "local"  # an address of one of the node's own interfaces (reachable from its LAN)
    PUBLIC = "public"  # configured by the operator (a public address, a port forward, a DNS name)
    REFLEXIVE = "reflexive"  # the address the control plane saw the node connect from (its NAT's outside)


class Endpoint(_Model):
    """An underlay address where a node's WireGuard listens: an IP literal or DNS name, a UDP port, and where
    the candidate comes from (`kind`)."""

    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")
    port: Port
    # Not strict: stored and API copies give the kind as its string, like JSON does.
    kind: EndpointKind = Field(default=EndpointKind.LOCAL, strict=False)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class MemberState(StrEnum):
    """Liveness of a member as decided by the registrar (the only authority)."""

    ACTIVE = "active"  # online and heartbeating within the TTL: peers keep a tunnel to it
    # The control plane lost it (will or missed TTL) a moment ago: peers keep the tunnel and probe it over the
    # mesh; a peer that gets an answer vouches for it in its next heartbeat.
    SUSPECT = "suspect"
    # The control plane lost it, but peers still reach it over the mesh: tunnels stay (see docs/design.md,
    # "Liveness: both planes").
    CONTROL_LOST = "control_lost"
    UNREACHABLE = "unreachable"  # goodbye, or lost on both planes: peers drop its tunnel, its IP stays reserved

    @property
    def tunnelled(self) -> bool:
        """Peers keep a tunnel to a member in this state."""
        return self is not MemberState.UNREACHABLE


class ErrorCode(StrEnum):
    """Why a request was refused. Stable strings: agents branch on them."""

    INVALID_REQUEST = "invalid_request"
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_USED = "token_used"
    INVALID_KEY = "invalid_key"
    KEY_CONFLICT = "key_conflict"
    KEY_REVOKED = "key_revoked"
    NOT_ENROLLED = "not_enrolled"
    # A new WireGuard key arrived through the broker: it must come over HTTPS with the node's own credential
    # (a broker admin could publish as any node, but cannot log in to the registrar as one).
    REKEY_OVER_HTTPS = "rekey_over_https"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    POOL_EXHAUSTED = "pool_exhausted"
    INTERNAL = "internal"


class ErrorInfo(_Model):
    """A machine-readable code and a human sentence."""

    code: ErrorCode
    message: str = Field(max_length=500)


class MeshSettings(_Model):
    """Mesh-wide settings the registrar hands every node at registration."""

    mesh: MeshName
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
    """Published by a node on register/<node> (QoS 1, not retained) at the start of every broker session.

    The node is already enrolled (meshcontract.messages.EnrollRequest over HTTPS): the broker admitted it with
    its own credential and lets it publish only on its own register topic, which only the registrar reads. So
    nothing here is secret, and a registration can only ever speak for its sender. Idempotent: the same node
    gets the same mesh IP. `epoch` starts a new control-plane session: status and heartbeats from older epochs
    are ignored from then on. A `public_key` other than the member's is a key rotation (see docs/security.md).
    """

    request_id: RequestId
    node_id: NodeId
    name: NodeName
    public_key: str = Field(max_length=64)
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=8)
    listen_port: Port
    epoch: Epoch

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_wg_key(value)


class RegisterReply(Message):
    """Published by the registrar on reply/<node> (QoS 1, not retained), signed: answers one RegisterRequest.
    Also the body of the answer to POST /v1/register, unsigned there: over HTTPS it comes from the registrar.

    The agent applies it to its machine (address, prefix, MTU, the route to the mesh network), so on MQTT it
    carries the registrar's signature like the membership: the registrar's broker rights alone must not be
    enough to write one. The random `request_id` makes an old genuine reply useless for a new request.
    """

    request_id: RequestId
    ok: bool
    node_id: NodeId
    mesh_ip: str | None = None
    prefix_len: int | None = Field(default=None, ge=0, le=128)
    settings: MeshSettings | None = None
    error: ErrorInfo | None = None
    # Signed by the registrar over MQTT (meshcontract.signing, kind "reply"): a broker cannot hand a node a
    # made-up address or settings. Replies over HTTPS come from the registrar itself and need no signature.
    sig: Signature = ""


class EnrollRequest(Message):
    """POSTed by a new node to the registrar's /v1/enroll over HTTPS (TLS pinned by the join token's CA pin).

    The only message that carries the join token, and it goes to the registrar alone, never over the broker.
    `password` is the node's own broker password, generated and stored (0600) by the agent before it asks: a
    lost reply is retried with the same password and key, and the registrar answers it again even though a
    single-use token is spent by then. The registrar keeps only a hash.
    """

    node_id: NodeId
    name: NodeName
    public_key: str = Field(max_length=64)
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=8)
    listen_port: Port
    token: str = Field(min_length=1, max_length=256, repr=False)
    password: str = Field(min_length=16, max_length=128, repr=False)

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_wg_key(value)


class EnrollReply(Message):
    """The registrar's answer to an EnrollRequest: the node's mesh address and what it needs to trust later.

    `signing_key` is the registrar's Ed25519 public key: the agent keeps it and accepts membership only when
    signed by it. `broker_url` is where the node's MQTT session goes (the agent may be configured otherwise).
    """

    ok: bool
    node_id: NodeId
    mesh_ip: str | None = None
    prefix_len: int | None = Field(default=None, ge=0, le=128)
    settings: MeshSettings | None = None
    broker_url: str | None = Field(default=None, max_length=256)
    signing_key: str | None = Field(default=None, max_length=64)
    error: ErrorInfo | None = None


class RegistrarInfo(Message):
    """GET /v1/info: who this registrar is. Served to anyone; the CA's pin in the join token is what makes the
    `ca_pem` here trustworthy (nothing else in this reply is trusted before it is checked)."""

    mesh: MeshName
    ca_pem: str = Field(max_length=16 * 1024)
    broker_url: str | None = Field(default=None, max_length=256)


class Reflection(Message):
    """GET /v1/reflect: the address the registrar sees this request come from (the node's NAT's outside, if
    any). The agent advertises it, with its WireGuard port, as a `reflexive` endpoint candidate."""

    address: str = Field(max_length=45)

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


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


class BrokenPath(_Model):
    """A peer this node holds a tunnel to whose WireGuard handshake is stale (or never happened)."""

    node_id: NodeId
    handshake_age_s: float | None = Field(ge=0)  # None: no handshake since the tunnel was configured


class PathReport(_Model):
    """A node's data plane in a heartbeat: peers with a fresh handshake, and every peer without one."""

    fresh: int = Field(ge=0, le=MAX_MEMBERS)
    broken: list[BrokenPath] = Field(default_factory=list, max_length=MAX_BROKEN_PATHS)
    truncated: bool = False  # more broken paths than fit: `broken` lists the first MAX_BROKEN_PATHS


class Heartbeat(Message):
    """Published by a node on heartbeat/<node> (QoS 0, not retained) every heartbeat interval, and at once when a
    probe of a suspect member was answered (its vouch must arrive within the registrar's vouch wait)."""

    node_id: NodeId
    epoch: Epoch
    seq: int = Field(ge=0, lt=2**63)
    sent_at: Timestamp
    # Suspect or control-lost members this node just reached over the mesh (a probe answered): its vouch.
    alive: list[NodeId] = Field(default_factory=list, max_length=MAX_VOUCHES)
    # The data plane as this node sees it, sent when it changes and at least every minute: how many peers have a
    # fresh handshake, and the ones that do not (a path broken while both ends reach the broker). None: not in
    # this heartbeat.
    paths: PathReport | None = None


class MemberRecord(Message):
    """Published by the registrar on members/<node> (QoS 1, retained); an empty payload is a tombstone.

    `revision` is the membership revision at which this record last changed. For observers: agents read the
    same records inside the signed MembershipSnapshot and MembershipDelta, not on this topic.
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


class MembershipSnapshot(Message):
    """Published by the registrar on snapshot (QoS 1, retained), signed: every member at `revision`.

    What an agent starts from and resynchronises from; complete by construction. `revision` only grows (it
    survives registrar restarts), so an agent never goes back to an older snapshot than the one it holds.
    """

    mesh: MeshName
    revision: int = Field(ge=0)
    members: list[MemberRecord] = Field(max_length=MAX_MEMBERS)
    published_at: Timestamp
    sig: Signature = ""


class MembershipDelta(Message):
    """Published by the registrar on delta (QoS 1, not retained), signed: what changed after `from_revision`.

    Applies to a membership at exactly `from_revision` and yields `to_revision`: `upserts` are the changed
    members' records as they are now, `removals` the node ids no longer members. An agent holding another
    revision has missed something and resynchronises from the retained snapshot instead.
    """

    mesh: MeshName
    from_revision: int = Field(ge=0)
    to_revision: int = Field(ge=0)
    upserts: list[MemberRecord] = Field(default_factory=list, max_length=MAX_MEMBERS)
    removals: list[NodeId] = Field(default_factory=list, max_length=MAX_MEMBERS)
    published_at: Timestamp
    sig: Signature = ""

    @model_validator(mode="after")
    def _range(self) -> MembershipDelta:
        if self.to_revision <= self.from_revision:
            raise ValueError("to_revision must be greater than from_revision")
        return self


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
    depth = json_depth(payload)
    if depth > MAX_DEPTH:
        raise PayloadError(f"{model.__name__}: JSON nested {depth} deep (at most {MAX_DEPTH})")
    try:
        data = json.loads(payload)
    # ValueError beyond JSONDecodeError: an integer of more than sys.get_int_max_str_digits() digits, which
    # json.loads refuses to convert (it once escaped here and cost the registrar a whole batch).
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"{model.__name__}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError(f"{model.__name__}: expected a JSON object, got {type(data).__name__}")
    if data.get("v") not in (None, SCHEMA_VERSION) and "v" in model.model_fields:
        # The version is named only when it is one (a number): any other `v` is the sender's text, never repeated.
        version = data["v"] if type(data["v"]) is int and 0 <= data["v"] < 2**31 else "(not a version number)"
        raise PayloadError(f"{model.__name__}: unsupported schema version {version}, this side speaks {SCHEMA_VERSION}")
    try:
        # JSON mode: strict models still accept JSON numbers/strings for their declared types.
        return model.model_validate_json(payload)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(map(str, error_location(e['loc']))) or '<root>'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise PayloadError(f"{model.__name__}: {reasons}") from None


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def error_location(loc: Iterable[str | int]) -> list[str | int]:
    """Where a validation error is (pydantic's `loc`), fit to show the sender or a log: a part that is neither
    an index nor a field-like name (a made-up key, with bidi overrides, newlines or 60 KiB of text) is replaced,
    never repeated back (found by fuzzing)."""
    return [p if isinstance(p, int) or _FIELD_NAME.fullmatch(p) else "(unknown field)" for p in loc]


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(payload: bytes | str) -> int:
    """How deeply arrays and objects nest in `payload`, found without parsing it (strings are skipped).

    Regular expressions keep it at C speed: a multi-megabyte membership snapshot is checked in milliseconds.
    """
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    steps = [1 if b in "[{" else -1 for b in _BRACKETS.findall(_JSON_STRING.sub("", text))]
    return max(itertools.accumulate(steps), default=0)


def encode(message: BaseModel) -> bytes:
    """Serialise a message for the wire (compact JSON, readable in mosquitto_sub)."""
    return message.model_dump_json().encode()


def canonical_json(message: BaseModel) -> bytes:
    """Canonical bytes of a message: sorted keys, no whitespace. Stable across processes; what gets signed."""
    return json.dumps(message.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def node_id_ok(value: str) -> bool:
    """True if `value` is a valid node id (same rule as topic levels)."""
    return is_valid_id(value)
