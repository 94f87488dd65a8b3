"""The registrar's HTTP API (FastAPI): enrollment, authenticated registration, state retrieval, administration.

Every write goes through the same single writer as MQTT input (RegistrarService.call), so HTTP and MQTT obey
the same rules and are serialised with each other. Reads use the writer's latest committed snapshot.

Who may do what (docs/security.md):
  - anyone: GET /v1/info (the CA; trusted only through the join token's pin), GET /healthz, POST /v1/enroll
    (the join token is the credential; rate-limited per source address);
  - a node, with HTTP Basic `node_id:own password`: POST /v1/register for itself, and reading membership;
  - an admin, with `Authorization: Bearer <admin_token>` or through the registrar's local admin socket: tokens,
    removal and revocation, /metrics, and reading.
OpenAPI: /docs, /openapi.json.
"""

from __future__ import annotations

import base64
import hmac
import threading
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from meshcontract.errors import PayloadError
from meshcontract.messages import (
    EnrollReply,
    EnrollRequest,
    ErrorCode,
    MemberState,
    RegisterReply,
    RegisterRequest,
    RegistrarInfo,
    decode,
    error_location,
)
from meshcontract.ratelimit import RateLimiter, RatePolicy
from registrar import api_admin
from registrar.httpserver import MAX_BODY, BodyLimit
from registrar.metrics import render_metrics
from registrar.service import RegistrarService
from registrar.views import Health, MemberView, MeshView

STATUS_OF = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_KEY: 400,
    ErrorCode.INVALID_TOKEN: 403,
    ErrorCode.TOKEN_EXPIRED: 403,
    ErrorCode.TOKEN_USED: 403,
    ErrorCode.KEY_REVOKED: 403,
    ErrorCode.NOT_ENROLLED: 403,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.KEY_CONFLICT: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.POOL_EXHAUSTED: 503,
    ErrorCode.INTERNAL: 500,
}
# Enrollment and registration attempts per source address: a few at once, then one every few seconds. Generous
# for a real node (it retries with backoff), tight for a flood or a token/password guesser.
DEFAULT_RATE = RatePolicy(rate_per_s=0.5, burst=10)

_bearer = HTTPBearer(auto_error=False, description="the registrar's admin token")


class Access:
    """Who a request is: the admin (local socket or bearer token), a node (Basic auth), or nobody."""

    def __init__(
        self, service: RegistrarService, *, admin_token: str, local_admin: bool, rate: RatePolicy
    ) -> None:
        self._service = service
        self._admin_token = admin_token
        self._local_admin = local_admin
        self._limiter = RateLimiter(rate)
        self._lock = threading.Lock()

    def limited(self, request: Request) -> None:
        """429 when the request's source address has used up its allowance (never for the local socket)."""
        if self._local_admin:
            return
        source = request.client.host if request.client else "?"
        now = time.monotonic()
        with self._lock:
            allowed = self._limiter.allow(source, now=now)
            wait = 0.0 if allowed else self._limiter.retry_after(source, now=now)
        if not allowed:
            self._service.count("rate_limited")
            raise HTTPException(
                status_code=429, detail="too many requests from this address", headers={"Retry-After": f"{wait:.0f}"}
            )

    def is_admin(self, credentials: HTTPAuthorizationCredentials | None) -> bool:
        if self._local_admin:
            return True
        return credentials is not None and hmac.compare_digest(
            credentials.credentials.encode(), self._admin_token.encode()
        )

    def node(self, request: Request) -> str | None:
        """The node id of a request with valid HTTP Basic node credentials; None without; 401 (rate-limited)
        for wrong ones."""
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        # ValueError, not only binascii.Error: a header that is not ASCII ("Basic é") raised it and answered 500.
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
            user, password = "", ""
        if user and self._service.authenticate(user, password):
            return user
        self._service.count("auth_failures")
        self.limited(request)  # a wrong password costs the guesser from its allowance
        raise HTTPException(status_code=401, detail="wrong node credentials", headers={"WWW-Authenticate": "Basic"})


def create_app(
    service: RegistrarService,
    *,
    admin_token: str,
    info: RegistrarInfo,
    local_admin: bool = False,
    pin: str,
    rate: RatePolicy = DEFAULT_RATE,
    join_command: Callable[[], str] = lambda: "meshvpn-agent --registrar URL --join-token TOKEN",
) -> FastAPI:
    """The FastAPI application serving `service`. `local_admin`: every request is the admin (the admin socket)."""
    app = FastAPI(
        title="meshvpn registrar",
        version="1",
        description=(
            "Control plane of one meshvpn mesh: enrollment, registration, mesh IPs, membership and liveness. "
            "The same membership is published over MQTT as a signed retained snapshot and signed deltas. "
            "Nodes authenticate with HTTP Basic (node id, own password); admin endpoints need "
            "`Authorization: Bearer <admin_token>`."
        ),
    )
    access = Access(service, admin_token=admin_token, local_admin=local_admin, rate=rate)
    app.add_middleware(BodyLimit, limit=MAX_BODY)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, and an input such as NaN cannot be rendered as JSON: that turned a
        # bad request into a 500. Say where and why, never echo.
        errors = [
            {"loc": error_location(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    def admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if not access.is_admin(credentials):
            service.count("auth_failures")
            raise HTTPException(status_code=401, detail="admin token required", headers={"WWW-Authenticate": "Bearer"})

    def reader(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if access.is_admin(credentials):
            return
        if access.node(request) is None:
            raise HTTPException(status_code=401, detail="node credentials or the admin token required",
                                headers={"WWW-Authenticate": "Basic"})  # fmt: skip

    @app.get("/v1/info", response_model=RegistrarInfo, summary="The mesh, its CA and its broker (public)")
    def registrar_info() -> RegistrarInfo:
        return info

    @app.post(
        "/v1/enroll",
        response_model=EnrollReply,
        summary="Enroll a new node with a join token",
        description=(
            "The only request that carries a join token; send it over TLS verified against the CA whose pin the "
            "token carries. Admits the node (mesh IP, broker account with the password it chose) or answers a "
            "retry of the same node (same key and password) again. Refusals: 400 invalid_request/invalid_key, "
            "401 unauthorized (node id taken), 403 token errors / key_revoked, 409 key_conflict, 429 rate_limited, "
            "503 pool_exhausted."
        ),
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": EnrollRequest.model_json_schema()}}}
        },
        responses={code: {"model": EnrollReply} for code in (400, 401, 403, 409, 429, 503)},
    )
    async def enroll(request: Request) -> JSONResponse:
        access.limited(request)
        try:
            body = decode(EnrollRequest, await request.body())
        except PayloadError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        outcome = await _in_thread(service.enroll, body)
        reply = outcome.enroll_reply
        assert reply is not None
        if not reply.ok:
            return JSONResponse(reply.model_dump(mode="json"), status_code=STATUS_OF.get(reply.error.code, 400))
        reply = reply.model_copy(update={"broker_url": info.broker_url, "signing_key": service.signer.public_key})
        return JSONResponse(reply.model_dump(mode="json"))

    @app.post(
        "/v1/register",
        response_model=RegisterReply,
        summary="Re-register this node (authenticated)",
        description=(
            "Same semantics as a RegisterRequest on MQTT register/<node>, for the node the HTTP Basic credentials "
            "(node id, own broker password) prove: idempotent (same mesh IP), a new public key is a rotation. "
            "401 without valid credentials, 403 for a request about another node."
        ),
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": RegisterRequest.model_json_schema()}}}
        },
        responses={code: {"model": RegisterReply} for code in (400, 403, 409)},
    )
    async def register(request: Request) -> JSONResponse:
        access.limited(request)
        node_id = access.node(request)
        if node_id is None:
            raise HTTPException(status_code=401, detail="node credentials required", headers={"WWW-Authenticate": "Basic"})
        payload = await request.body()
        try:
            claimed = decode(RegisterRequest, payload).node_id
        except PayloadError:
            claimed = node_id  # the engine answers a malformed request with its reason
        if claimed != node_id:
            raise HTTPException(status_code=403, detail=f"these credentials are node {node_id}'s, not {claimed}'s")
        outcome = await _in_thread(service.register_payload, payload, node_id=node_id)
        if outcome.reply is None:
            raise HTTPException(status_code=400, detail=outcome.rejected or "bad request")
        status = 200 if outcome.reply.ok else STATUS_OF.get(outcome.reply.error.code, 400)
        return JSONResponse(outcome.reply.model_dump(mode="json"), status_code=status)

    @app.get("/v1/nodes", response_model=list[MemberView], dependencies=[Depends(reader)],
             summary="All members, sorted by node id")  # fmt: skip
    def nodes() -> list[MemberView]:
        members = service.state.membership.members
        return [MemberView.of(members[i]) for i in sorted(members)]

    @app.get("/v1/nodes/{node_id}", response_model=MemberView, dependencies=[Depends(reader)],
             summary="One member", responses={404: {}})  # fmt: skip
    def node(node_id: str) -> MemberView:
        member = service.state.membership.members.get(node_id)
        if member is None:
            raise HTTPException(status_code=404, detail=api_admin.no_member(node_id))
        return MemberView.of(member)

    @app.get("/v1/mesh", response_model=MeshView, dependencies=[Depends(reader)],
             summary="Mesh settings and the current membership revision")  # fmt: skip
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

    @app.get("/healthz", response_model=Health, summary="Liveness and readiness of the registrar (public)")
    def healthz() -> Health:
        return Health(
            ok=True,
            ready=service.wait_ready(0),
            broker_connected=service.connected,
            revision=service.state.membership.revision,
        )

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(admin)], summary="Prometheus metrics")
    def metrics() -> str:
        return render_metrics(service.metrics())

    app.include_router(api_admin.router(service, admin=admin, join_command=join_command, pin=pin))
    return app


async def _in_thread(fn, *args, **kwargs):
    # The writer call blocks until the command is committed: keep it off the event loop.
    return await run_in_threadpool(fn, *args, **kwargs)
