"""What the registrar's HTTP API answers with: response and request models. No I/O here."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meshcontract.messages import Endpoint, MemberState, MeshSettings
from registrar import tokens
from registrar.engine import RevokedKey
from registrar.membership import Member


class MemberView(BaseModel):
    """One member as the registrar holds it: its published record plus liveness bookkeeping."""

    model_config = ConfigDict(extra="forbid")

    node_id: str
    name: str = Field(description="display alias only; never used for addressing")
    mesh_ip: str
    public_key: str = Field(description="WireGuard public key (base64)")
    endpoints: list[Endpoint]
    listen_port: int
    state: MemberState
    revision: int = Field(description="membership revision at which this record last changed")
    epoch: int = Field(description="the node's current session; older status/heartbeats are ignored")
    joined_at: float
    updated_at: float
    last_seen: float = Field(description="last registration, heartbeat or online status (unix time)")
    unreachable_since: float | None = None

    @classmethod
    def of(cls, m: Member) -> MemberView:
        return cls(
            node_id=m.node_id,
            name=m.name,
            mesh_ip=m.mesh_ip,
            public_key=m.public_key,
            endpoints=list(m.endpoints),
            listen_port=m.listen_port,
            state=m.state,
            revision=m.revision,
            epoch=m.epoch,
            joined_at=m.joined_at,
            updated_at=m.updated_at,
            last_seen=m.last_seen,
            unreachable_since=m.unreachable_since,
        )


class PathView(BaseModel):
    """A tunnel without a fresh WireGuard handshake, as its source reported it (registrar.paths)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="the member that holds the tunnel and reported it")
    target: str
    handshake_age_s: float | None = Field(description="None: no handshake since the tunnel was configured")
    reported_at: float
    both_active: bool = Field(description="both ends reach the control plane: only the data plane is broken")


class PathsView(BaseModel):
    """The data plane as the members report it: fresh tunnels counted, broken ones listed."""

    model_config = ConfigDict(extra="forbid")

    reporting: int = Field(description="active members whose newest report is from their current session")
    fresh: int = Field(description="tunnels with a fresh handshake, summed over the reports")
    broken: list[PathView]


class MeshView(BaseModel):
    """Mesh-wide settings, the current membership revision and member counts."""

    settings: MeshSettings
    revision: int
    members: int
    active: int
    suspect: int = Field(description="lost by the control plane a moment ago; peers are probing them")
    control_lost: int = Field(description="lost by the control plane, still reached by peers: tunnels kept")
    unreachable: int
    registrar_instance: str
    broker_connected: bool


class TokenRequest(BaseModel):
    """A new join token: single-use unless `reusable`; `ttl_s` limits its life, `max_uses` a reusable one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    reusable: bool = False
    ttl_s: float | None = Field(default=None, gt=0, le=10 * 365 * 86400)
    max_uses: int | None = Field(default=None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _uses_need_reusable(self) -> TokenRequest:
        # Silently turning "max_uses: 5" into a single-use token surprised an operator: say so instead.
        if self.max_uses is not None and not self.reusable:
            raise ValueError("max_uses applies to reusable tokens: set reusable: true as well")
        return self


class TokenView(BaseModel):
    """A stored join token (never its secret)."""

    id: str
    created_at: float
    expires_at: float | None
    reusable: bool
    max_uses: int | None
    uses: int

    @classmethod
    def of(cls, t: tokens.JoinToken) -> TokenView:
        return cls(
            id=t.id,
            created_at=t.created_at,
            expires_at=t.expires_at,
            reusable=t.reusable,
            max_uses=t.max_uses,
            uses=t.uses,
        )


class CreatedToken(TokenView):
    """A token just created: `token` (the secret and the CA pin, as agents take it) is shown this once and never
    stored in clear; `join_command` is how a node uses it."""

    token: str
    join_command: str


class RevokedView(BaseModel):
    """A key an admin removed: it cannot enroll again until approved."""

    public_key: str
    node_id: str
    revoked_at: float

    @classmethod
    def of(cls, r: RevokedKey) -> RevokedView:
        return cls(public_key=r.public_key, node_id=r.node_id, revoked_at=r.revoked_at)


class ApproveRequest(BaseModel):
    """Let a revoked key enroll again."""

    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(max_length=64)


class Health(BaseModel):
    """Liveness and readiness of the registrar: `ready` once it is connected and subscribed (serving)."""

    ok: bool
    ready: bool
    broker_connected: bool
    revision: int


class ObserverPassword(BaseModel):
    """A new password for the observer account (read membership, status and heartbeats; nothing else)."""

    username: str
    password: str
