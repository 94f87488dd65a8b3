"""The registrar's HTTP API (FastAPI): registration and state retrieval for tools and nodes without MQTT.

Every write goes through the same single writer as MQTT input (RegistrarService.call), so HTTP and MQTT
registrations obey the same rules and are serialised with each other. Reads use the writer's latest
committed snapshot. Admin endpoints need `Authorization: Bearer <admin_token>`. OpenAPI: /docs, /openapi.json.
"""

from __future__ import annotations

import hmac
import threading
import time
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from meshcontract.messages import (
    Endpoint,
    ErrorCode,
    MemberState,
    MeshSettings,
    RegisterReply,
    RegisterRequest,
)
from registrar import engine, tokens
from registrar.membership import Member
from registrar.metrics import COUNTERS
from registrar.service import RegistrarService

_STATUS_OF = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_KEY: 400,
    ErrorCode.INVALID_TOKEN: 403,
    ErrorCode.TOKEN_EXPIRED: 403,
    ErrorCode.TOKEN_USED: 403,
    ErrorCode.KEY_CONFLICT: 409,
    ErrorCode.POOL_EXHAUSTED: 503,
    ErrorCode.INTERNAL: 500,
}


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
    revision: int = Field(description="roster revision at which this record last changed")
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


class MeshView(BaseModel):
    """Mesh-wide settings, the current roster revision and member counts."""

    settings: MeshSettings
    revision: int
    members: int
    active: int
    unreachable: int
    registrar_instance: str
    broker_connected: bool


class TokenRequest(BaseModel):
    """A new join token: single-use unless `reusable`; `ttl_s` limits its life, `max_uses` a reusable one."""

    model_config = ConfigDict(extra="forbid")

    reusable: bool = False
    ttl_s: float | None = Field(default=None, gt=0)
    max_uses: int | None = Field(default=None, ge=1)


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
    """A token just created: `token` is shown this once and never stored in clear."""

    token: str


class Health(BaseModel):
    """Liveness and readiness of the registrar: `ready` once it is connected and subscribed (serving)."""

    ok: bool
    ready: bool
    broker_connected: bool
    revision: int


_bearer = HTTPBearer(auto_error=False, description="the registrar's admin token")


def create_app(service: RegistrarService, *, admin_token: str) -> FastAPI:
    """The FastAPI application serving `service`."""
    app = FastAPI(
        title="meshvpn registrar",
        version="1",
        description=(
            "Control plane of one meshvpn mesh: registration, mesh IPs, membership and liveness. "
            "The same state is published over MQTT (retained members/<node> and roster). "
            "Admin endpoints need `Authorization: Bearer <admin_token>`."
        ),
    )

    def admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if credentials is None or not hmac.compare_digest(
            credentials.credentials.encode(), admin_token.encode()
        ):
            raise HTTPException(
                status_code=401, detail="admin token required", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.post(
        "/v1/register",
        response_model=RegisterReply,
        summary="Register or re-register a node",
        description=(
            "Same semantics as a RegisterRequest on MQTT register/<node>: idempotent for the same key (same node "
            "id, same mesh IP), a join token is needed only for a node that is not yet a member. Refusals come "
            "back as a RegisterReply with ok=false and an error code (400 invalid_request/invalid_key, 403 token "
            "errors, 409 key_conflict, 503 pool_exhausted). A joining node's own broker_password is stored if its "
            "id has no password entry yet; an existing entry is never replaced."
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": RegisterRequest.model_json_schema()}},
            }
        },
        responses={
            400: {"model": RegisterReply},
            403: {"model": RegisterReply},
            409: {"model": RegisterReply},
        },
    )
    async def register(request: Request) -> JSONResponse:
        payload = await request.body()
        outcome = await _in_thread(service.register_payload, payload)
        if outcome.reply is None:
            raise HTTPException(status_code=400, detail=outcome.rejected or "bad request")
        status = 200 if outcome.reply.ok else _STATUS_OF.get(outcome.reply.error.code, 400)
        return JSONResponse(outcome.reply.model_dump(mode="json"), status_code=status)

    @app.get("/v1/nodes", response_model=list[MemberView], summary="All members, sorted by node id")
    def nodes() -> list[MemberView]:
        members = service.state.membership.members
        return [MemberView.of(members[i]) for i in sorted(members)]

    @app.get("/v1/nodes/{node_id}", response_model=MemberView, summary="One member", responses={404: {}})
    def node(node_id: str) -> MemberView:
        member = service.state.membership.members.get(node_id)
        if member is None:
            raise HTTPException(status_code=404, detail=f"no member {node_id}")
        return MemberView.of(member)

    @app.get("/v1/mesh", response_model=MeshView, summary="Mesh settings and the current roster revision")
    def mesh() -> MeshView:
        ms = service.state.membership
        return MeshView(
            settings=service.config.mesh,
            revision=ms.revision,
            members=len(ms.members),
            active=ms.count(MemberState.ACTIVE),
            unreachable=ms.count(MemberState.UNREACHABLE),
            registrar_instance=service.instance,
            broker_connected=service.connected,
        )

    @app.delete(
        "/v1/nodes/{node_id}",
        status_code=204,
        dependencies=[Depends(admin)],
        summary="Remove a member (admin)",
        description="Tombstones its record at once and quarantines its IP; its key and node id become free.",
        responses={404: {}},
    )
    async def delete_node(node_id: str) -> None:
        outcome = await _in_thread(
            service.call,
            lambda state, now: engine.remove_member(state, node_id, now=now, reason="removed by admin"),
        )
        if not outcome.removed:
            raise HTTPException(status_code=404, detail=f"no member {node_id}")

    @app.post(
        "/v1/tokens",
        response_model=CreatedToken,
        status_code=201,
        dependencies=[Depends(admin)],
        summary="Create a join token (admin)",
    )
    async def create_token(body: TokenRequest) -> CreatedToken:
        secret = tokens.new_secret()
        outcome = await _in_thread(
            service.call,
            lambda state, now: engine.create_token(
                state,
                secret=secret,
                now=now,
                ttl_s=body.ttl_s,
                reusable=body.reusable,
                max_uses=body.max_uses,
            ),
        )
        assert outcome.token is not None
        return CreatedToken(token=secret, **TokenView.of(outcome.token).model_dump())

    @app.get(
        "/v1/tokens",
        response_model=list[TokenView],
        dependencies=[Depends(admin)],
        summary="Join tokens (admin)",
    )
    def list_tokens() -> list[TokenView]:
        return [TokenView.of(t) for t in sorted(service.state.tokens.values(), key=lambda t: t.created_at)]

    @app.delete(
        "/v1/tokens/{token_id}",
        status_code=204,
        dependencies=[Depends(admin)],
        summary="Revoke a join token (admin)",
        responses={404: {}},
    )
    async def revoke_token(token_id: str) -> None:
        outcome = await _in_thread(
            service.call, lambda state, now: engine.revoke_token(state, token_id), refresh_tokens=True
        )
        if outcome.ignored:
            raise HTTPException(status_code=404, detail=f"no token {token_id}")

    @app.get("/healthz", response_model=Health, summary="Liveness of the registrar process")
    def healthz() -> Health:
        return Health(
            ok=True,
            ready=service.wait_ready(0),
            broker_connected=service.connected,
            revision=service.state.membership.revision,
        )

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics() -> str:
        return render_metrics(service.metrics())

    return app


async def _in_thread(fn, *args, **kwargs):
    # The writer call blocks until the command is committed: keep it off the event loop.
    return await run_in_threadpool(fn, *args, **kwargs)


_GAUGES = [
    ("revision", "Current roster revision.", "revision"),
    ("quarantined_ips", "Released IPs still in quarantine.", "quarantined_ips"),
    ("broker_connected", "1 while connected to the broker.", "broker_connected"),
    (
        "liveness_checked_timestamp_seconds",
        "When liveness was last judged (unix time); absent before the first check.",
        "liveness_checked_at",
    ),
]


def render_metrics(values: dict[str, float]) -> str:
    """Prometheus text exposition of the registrar's numbers (RegistrarService.metrics())."""
    lines = []

    def family(name: str, kind: str, help_text: str) -> str:
        full = f"meshvpn_registrar_{name}"
        lines.extend([f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"])
        return full

    full = family("members", "gauge", "Members by state.")
    for state in MemberState:
        lines.append(f'{full}{{state="{state.value}"}} {_number(values.get(f"members_{state.value}", 0))}')
    # Every counter the service keeps is declared in registrar.metrics.COUNTERS, so every one is exported.
    for spec in COUNTERS:
        full = family(spec.metric, "counter", spec.help)
        lines.append(f"{full} {_number(values.get(f'counter_{spec.key}', 0))}")
    for name, help_text, key in _GAUGES:
        if key in values:
            full = family(name, "gauge", help_text)
            lines.append(f"{full} {_number(values[key])}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    # Full precision: ':g' would print a counter of 1234567 as 1.23457e+06 and a unix time to the ten seconds.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class HttpServer:
    """uvicorn serving the API in a background thread (started from `meshvpn-registrar run`)."""

    def __init__(self, app: FastAPI, *, host: str, port: int) -> None:
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        )
        # Signals belong to the CLI's main thread, not to uvicorn in a worker thread.
        self._server.install_signal_handlers = lambda: None
        self._thread = threading.Thread(target=self._server.run, name="registrar-http", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("HTTP API did not start")
            time.sleep(0.02)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
