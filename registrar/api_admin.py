"""The registrar's admin endpoints: join tokens, removing and revoking members, approving revoked keys.

Reached with the admin token over the network or, without one, through the registrar's local admin socket,
which is how `meshvpn-registrar tokens|nodes ...` talk to the running registrar.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from fastapi import APIRouter, Depends, HTTPException
from starlette.concurrency import run_in_threadpool

from meshcontract import access, jointoken
from registrar import engine, tokens
from registrar.errors import CredentialsError
from registrar.service import RegistrarService
from registrar.views import (
    ApproveRequest,
    CreatedToken,
    ObserverPassword,
    RevokedView,
    TokenRequest,
    TokenView,
)

_TOKEN_ID = re.compile(rf"[0-9a-f]{{{tokens.ID_LEN}}}")


# A 404 names what was not found only when it is well-formed: an answer never echoes arbitrary input (a path
# segment with bidi overrides or control characters came back verbatim; found by fuzzing).
def no_member(node_id: str) -> str:
    return f"no member {node_id}" if access.is_node_id(node_id) else "no such member (not a node id)"


def no_token(token_id: str) -> str:
    return f"no token {token_id}" if _TOKEN_ID.fullmatch(token_id) else "no such token (not a token id)"


def router(service: RegistrarService, *, admin: Callable, join_command: Callable[[], str], pin: str) -> APIRouter:
    """Admin routes; `admin` is the dependency that refuses anyone else."""
    r = APIRouter(dependencies=[Depends(admin)])

    @r.delete(
        "/v1/nodes/{node_id}",
        status_code=204,
        summary="Remove a member (admin)",
        description=(
            "Tombstones its record at once, quarantines its IP, deletes its broker account (its session is "
            "dropped) and revokes its key: that key cannot enroll again, not even with a reusable token, until "
            "approved (POST /v1/revoked/approve). `revoke=false` lets it come back with a token."
        ),
        responses={404: {}},
    )
    async def delete_node(node_id: str, revoke: bool = True) -> None:
        outcome = await run_in_threadpool(
            service.call,
            lambda state, now: engine.remove_member(state, node_id, now=now, revoke_key=revoke),
        )
        if not outcome.removed:
            raise HTTPException(status_code=404, detail=no_member(node_id))

    @r.get("/v1/revoked", response_model=list[RevokedView], summary="Revoked keys (admin)")
    def revoked() -> list[RevokedView]:
        return [RevokedView.of(v) for v in sorted(service.state.revoked.values(), key=lambda v: v.revoked_at)]

    @r.post("/v1/revoked/approve", status_code=204, summary="Let a revoked key enroll again (admin)",
            responses={404: {}})  # fmt: skip
    async def approve(body: ApproveRequest) -> None:
        outcome = await run_in_threadpool(service.call, lambda state, now: engine.approve_key(state, body.public_key))
        if outcome.ignored:
            raise HTTPException(status_code=404, detail="that key is not revoked")

    @r.post("/v1/tokens", response_model=CreatedToken, status_code=201, summary="Create a join token (admin)")
    async def create_token(body: TokenRequest) -> CreatedToken:
        secret = tokens.new_secret()
        outcome = await run_in_threadpool(
            service.call,
            lambda state, now: engine.create_token(
                state, secret=secret, now=now, ttl_s=body.ttl_s, reusable=body.reusable, max_uses=body.max_uses
            ),
        )
        assert outcome.token is not None
        token = jointoken.compose(secret, pin)
        return CreatedToken(
            token=token,
            join_command=join_command().replace("TOKEN", token),
            **TokenView.of(outcome.token).model_dump(),
        )

    @r.get("/v1/tokens", response_model=list[TokenView], summary="Join tokens (admin)")
    def list_tokens() -> list[TokenView]:
        return [TokenView.of(t) for t in sorted(service.state.tokens.values(), key=lambda t: t.created_at)]

    @r.delete("/v1/tokens/{token_id}", status_code=204, summary="Revoke a join token (admin)", responses={404: {}})
    async def revoke_token(token_id: str) -> None:
        outcome = await run_in_threadpool(
            service.call, lambda state, now: engine.revoke_token(state, token_id), refresh_tokens=True
        )
        if outcome.ignored:
            raise HTTPException(status_code=404, detail=no_token(token_id))

    @r.post("/v1/accounts/observer", response_model=ObserverPassword, summary="New observer password (admin)")
    async def observer_password() -> ObserverPassword:
        password = secrets.token_urlsafe(24)
        try:
            await run_in_threadpool(service.set_service_account, access.OBSERVER_USER, password)
        except CredentialsError as exc:
            raise HTTPException(status_code=503, detail=f"cannot set the observer's account: {exc}") from exc
        return ObserverPassword(username=access.OBSERVER_USER, password=password)

    return r
