"""The registrar's decision layer: one pure function per command over the whole state. No I/O here.

`handle_message` turns one MQTT message (topic + raw payload) into an Outcome; the other handlers serve the
clock and the admin API. An Outcome carries the new CoreState, what the store must write (`delta`), what must
be published, the RegisterReply (if any) and why an input was refused or ignored. Bad input of every kind
yields an Outcome whose state is the old one: nothing to store, nothing to publish.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from meshcontract import access, jointoken, topics
from meshcontract.errors import ContractError, PayloadError
from meshcontract.messages import (
    MAX_DEPTH,
    MAX_PAYLOAD,
    EnrollReply,
    EnrollRequest,
    ErrorCode,
    ErrorInfo,
    Heartbeat,
    MeshSettings,
    NodeStatus,
    RegisterReply,
    RegisterRequest,
    check_wg_key,
    decode,
    json_depth,
)
from meshcontract.topics import Kind
from registrar import liveness, membership, tokens
from registrar import paths as paths_mod
from registrar.errors import Refused
from registrar.ipam import Ipam, Quarantined
from registrar.liveness import LivenessPolicy
from registrar.membership import Change, Member, Membership
from registrar.tokens import JoinToken, Tokens


@dataclass(frozen=True, slots=True)
class Config:
    """What the engine needs to know about the mesh it runs."""

    mesh: MeshSettings
    policy: LivenessPolicy
    require_token: bool = True


@dataclass(frozen=True, slots=True)
class RevokedKey:
    """A WireGuard key an admin removed: it cannot enroll again, not even with a valid token, until approved."""

    public_key: str
    node_id: str
    revoked_at: float


@dataclass(frozen=True, slots=True)
class CoreState:
    """Everything the registrar decides on: membership (with IPAM and revision), join tokens, revoked keys, and
    the members' newest path reports (in memory only: registrar.paths)."""

    membership: Membership
    tokens: Tokens
    revoked: Mapping[str, RevokedKey] = field(default_factory=lambda: MappingProxyType({}))
    paths: paths_mod.Paths = field(default_factory=lambda: paths_mod.EMPTY)


@dataclass(frozen=True, slots=True)
class Delta:
    """What one command changed, in the form the store writes in one transaction."""

    upsert_members: tuple[Member, ...] = ()
    delete_members: tuple[str, ...] = ()
    upsert_tokens: tuple[JoinToken, ...] = ()
    delete_tokens: tuple[str, ...] = ()
    revision: int | None = None  # the new global revision when it moved
    quarantine: tuple[Quarantined, ...] | None = None  # the full quarantine list when it changed
    upsert_revoked: tuple[RevokedKey, ...] = ()
    delete_revoked: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not (
            self.upsert_members
            or self.delete_members
            or self.upsert_tokens
            or self.delete_tokens
            or self.revision is not None
            or self.quarantine is not None
            or self.upsert_revoked
            or self.delete_revoked
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one command."""

    state: CoreState
    change: Change
    delta: Delta = field(default_factory=Delta)
    reply: RegisterReply | None = None
    reply_to: str | None = None  # node id whose reply topic gets `reply`
    rejected: str | None = None  # a refusal or malformed input: counted, logged at WARNING
    ignored: str | None = None  # valid but without effect (stale epoch, unknown node): logged at DEBUG
    token: JoinToken | None = None  # the token a command created or redeemed
    node_id: str | None = None  # the node the input concerned, if known (for logs)
    enroll_reply: EnrollReply | None = None  # the answer to an enrollment (HTTP)
    # Broker accounts to create (node id, clear password) before the outcome is committed, and to delete after:
    # an enrolled node can log in whatever crashes next; a removed one is cut off at once. Never logged.
    accounts_add: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    accounts_remove: tuple[str, ...] = ()

    @property
    def published(self) -> tuple[Member, ...]:
        return self.change.published

    @property
    def removed(self) -> tuple[Member, ...]:
        return self.change.removed


def _delta(
    before: CoreState, after: CoreState, change: Change, tokens_up=(), tokens_del=(), revoked_up=(), revoked_del=()
) -> Delta:
    b, a = before.membership, after.membership
    quarantine = None
    if a.ipam.quarantine is not b.ipam.quarantine and dict(a.ipam.quarantine) != dict(b.ipam.quarantine):
        quarantine = tuple(a.ipam.quarantine.values())
    return Delta(
        upsert_members=change.dirty,
        delete_members=tuple(m.node_id for m in change.removed),
        upsert_tokens=tuple(tokens_up),
        delete_tokens=tuple(tokens_del),
        revision=a.revision if a.revision != b.revision else None,
        quarantine=quarantine,
        upsert_revoked=tuple(revoked_up),
        delete_revoked=tuple(revoked_del),
    )


def _apply(state: CoreState, change: Change, **kw) -> Outcome:
    after = replace(state, membership=change.state)
    # Removed members lose their broker account at once (expiry or admin): the credential dies with them.
    removed = tuple(m.node_id for m in change.removed)
    return Outcome(
        after, change, _delta(state, after, change), ignored=change.ignored, accounts_remove=removed, **kw
    )


def _nothing(state: CoreState, **kw) -> Outcome:
    return Outcome(state, Change(state.membership), **kw)


def error_reply(request_id: str, node_id: str, code: ErrorCode, message: str) -> RegisterReply:
    """A refusal for `request_id`."""
    return RegisterReply(
        request_id=request_id, ok=False, node_id=node_id, error=ErrorInfo(code=code, message=message[:500])
    )


def register(
    state: CoreState, request: RegisterRequest, *, now: float, config: Config, may_rekey: bool = False
) -> Outcome:
    """Refresh the member of `request` at the start of a session (its sender is authenticated as that node);
    the Outcome's reply says ok (with IP and settings) or why not. A new key only with `may_rekey` (HTTPS)."""
    node = request.node_id
    try:
        change = membership.register(
            state.membership,
            node_id=node,
            name=request.name,
            public_key=request.public_key,
            endpoints=tuple(request.endpoints),
            listen_port=request.listen_port,
            epoch=request.epoch,
            now=now,
            revoked=state.revoked,
            may_rekey=may_rekey,
        )
    except Refused as exc:
        return _nothing(
            state,
            reply=error_reply(request.request_id, node, exc.code, exc.message),
            reply_to=node,
            rejected=f"registration refused ({exc.code}): {exc.message}",
            node_id=node,
        )
    after = replace(state, membership=change.state)
    member = change.state.members[node]
    reply = RegisterReply(
        request_id=request.request_id,
        ok=True,
        node_id=node,
        mesh_ip=member.mesh_ip,
        prefix_len=change.state.ipam.prefix_len,
        settings=config.mesh,
    )
    return Outcome(after, change, _delta(state, after, change), reply=reply, reply_to=node, node_id=node)


def enroll_error(node_id: str, code: ErrorCode, message: str) -> EnrollReply:
    """A refused enrollment."""
    return EnrollReply(ok=False, node_id=node_id, error=ErrorInfo(code=code, message=message[:500]))


def enroll(
    state: CoreState, request: EnrollRequest, *, now: float, config: Config, password_hash: str
) -> Outcome:
    """A new node with a join token (HTTPS): admit it, or answer a retry of an enrollment that already happened.

    `password_hash` is the hash of `request.password`, made by the caller (hashing salts with randomness).
    A node id that is already a member is answered again only for the same key *and* its own password (a retry
    after a lost reply, when a single-use token is spent by then); a token never takes over an identity.
    """
    node = request.node_id

    def refused(code: ErrorCode, message: str) -> Outcome:
        return _nothing(
            state,
            enroll_reply=enroll_error(node, code, message),
            rejected=f"enrollment refused ({code}): {message}",
            node_id=node,
        )

    def admitted(ms: Membership, change: Change, new_tokens: Tokens, token: JoinToken | None) -> Outcome:
        after = replace(state, membership=ms, tokens=new_tokens)
        member = ms.members[node]
        reply = EnrollReply(
            ok=True, node_id=node, mesh_ip=member.mesh_ip, prefix_len=ms.ipam.prefix_len, settings=config.mesh
        )
        return Outcome(
            after,
            change,
            _delta(state, after, change, tokens_up=(token,) if token else ()),
            enroll_reply=reply,
            token=token,
            node_id=node,
            accounts_add=((node, request.password),),
        )

    if request.public_key in state.revoked:
        return refused(ErrorCode.KEY_REVOKED, "this public key was removed by an admin; ask them to approve it")
    existing = state.membership.members.get(node)
    if existing is not None:
        if existing.public_key == request.public_key and access.verify_password(
            request.password, existing.password_hash
        ):
            return admitted(state.membership, Change(state.membership), state.tokens, None)
        return refused(ErrorCode.UNAUTHORIZED, f"node id {node} is already enrolled (a token cannot take it over)")
    try:
        secret = jointoken.parse(request.token).secret
    except ContractError:
        return refused(ErrorCode.INVALID_TOKEN, "malformed join token")
    try:
        change = membership.admit(
            state.membership,
            node_id=node,
            name=request.name,
            public_key=request.public_key,
            endpoints=tuple(request.endpoints),
            listen_port=request.listen_port,
            password_hash=password_hash,
            now=now,
        )
        new_tokens, token = (
            tokens.redeem(state.tokens, secret, now=now) if config.require_token else (state.tokens, None)
        )
    except Refused as exc:
        return refused(exc.code, exc.message)
    return admitted(change.state, change, new_tokens, token)


def authenticate(state: CoreState, node_id: str, password: str) -> bool:
    """True if `password` is the credential of member `node_id` (for the HTTP API)."""
    member = state.membership.members.get(node_id)
    return member is not None and bool(member.password_hash) and access.verify_password(password, member.password_hash)


def _key_ok(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        check_wg_key(value)
    except ValueError:
        return False
    return True


def _reject_register(state: CoreState, node: str, payload: bytes, reason: str) -> Outcome:
    """An unusable register/<node> payload: reply with an error if the payload names a request id."""
    request_id = None
    code = ErrorCode.INVALID_REQUEST
    try:
        shallow = len(payload) <= MAX_PAYLOAD and json_depth(payload) <= MAX_DEPTH
        data = json.loads(payload) if shallow else None
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: also an over-long integer
        data = None
    if isinstance(data, dict):
        rid = data.get("request_id")
        if (
            isinstance(rid, str)
            and 8 <= len(rid) <= 64
            and rid.replace("-", "").replace("_", "").isalnum()
            and rid.isascii()
        ):
            request_id = rid
        key = data.get("public_key")
        if key is not None and not _key_ok(key):
            code = ErrorCode.INVALID_KEY
    if request_id is None:
        return _nothing(
            state, rejected=f"bad registration: {reason} (no request_id to reply to)", node_id=node
        )
    return _nothing(
        state,
        reply=error_reply(request_id, node, code, reason),
        reply_to=node,
        rejected=f"bad registration: {reason}",
        node_id=node,
    )


def handle_message(
    state: CoreState, topic: str, payload: bytes, *, now: float, config: Config, may_rekey: bool = False
) -> Outcome:
    """One MQTT message from the broker: parse, check, apply. Never raises for bad input. A registration may
    change the node's key only with `may_rekey` (it came over HTTPS, not through the broker)."""
    try:
        parsed = topics.parse(topic)
    except ContractError as exc:
        return _nothing(state, rejected=f"unknown topic: {exc}")
    if parsed.mesh != config.mesh.mesh:
        return _nothing(state, rejected=f"message for another mesh {parsed.mesh!r}")
    node = parsed.node
    if node is not None and not access.is_node_id(node):
        # A reserved account name is a valid topic level but never a node: nothing on its topic is a node's input,
        # and a reply naming it would not even validate (it raised, and the writer dropped its whole batch).
        return _nothing(state, rejected=f"{node!r} is a reserved account name, not a node id")
    if parsed.kind is Kind.REGISTER:
        try:
            request = decode(RegisterRequest, payload)
        except PayloadError as exc:
            return _reject_register(state, node, payload, str(exc))
        if request.node_id != node:
            return _reject_register(
                state, node, payload, f"payload node_id {request.node_id!r} is not the topic's"
            )
        return register(state, request, now=now, config=config, may_rekey=may_rekey)
    if parsed.kind is Kind.STATUS:
        if not payload:
            # Our own clean-up of a removed member's retained status echoes back as an empty message.
            return _nothing(state, ignored="empty status (retained status cleared)", node_id=node)
        try:
            msg = decode(NodeStatus, payload)
        except PayloadError as exc:
            return _nothing(state, rejected=f"bad status: {exc}", node_id=node)
        if msg.node_id != node:
            return _nothing(
                state, rejected=f"status node_id {msg.node_id!r} is not the topic's", node_id=node
            )
        change = liveness.status(
            state.membership,
            node_id=node,
            online=msg.state == "online",
            epoch=msg.epoch,
            now=now,
            last_will=msg.last_will,
            vouch_wait_s=config.policy.vouch_wait_s,
        )
        return _apply(state, change, node_id=node)
    if parsed.kind is Kind.HEARTBEAT:
        try:
            hb = decode(Heartbeat, payload)
        except PayloadError as exc:
            return _nothing(state, rejected=f"bad heartbeat: {exc}", node_id=node)
        if hb.node_id != node:
            return _nothing(
                state, rejected=f"heartbeat node_id {hb.node_id!r} is not the topic's", node_id=node
            )
        change = liveness.heartbeat(state.membership, node_id=node, epoch=hb.epoch, now=now, alive=hb.alive)
        outcome = _apply(state, change, node_id=node)
        if hb.paths is None or change.ignored is not None:
            return outcome
        reported = paths_mod.update(outcome.state.paths, node_id=node, epoch=hb.epoch, report=hb.paths, now=now)
        return replace(outcome, state=replace(outcome.state, paths=reported))
    return _nothing(state, ignored=f"not a topic the registrar consumes: {parsed.kind}", node_id=node)


def tick(state: CoreState, *, now: float, config: Config, candidates: Iterable[str] | None = None) -> Outcome:
    """Apply the clock (liveness, expiry, quarantine); `candidates` as registrar.liveness.tick."""
    return _apply(state, liveness.tick(state.membership, now=now, policy=config.policy, candidates=candidates))


def forgive_offline(state: CoreState, *, since: float, now: float) -> Outcome:
    """On reconnection to the broker: revive members whose last will arrived at or after `since`."""
    return _apply(state, liveness.forgive_offline(state.membership, since=since, now=now))


def remove_member(
    state: CoreState, node_id: str, *, now: float, reason: str = "removed by admin", revoke_key: bool = True
) -> Outcome:
    """Admin removal: the member is tombstoned at once, its IP quarantined and its broker account deleted; with
    `revoke_key` its WireGuard key cannot enroll again (not even with a reusable token) until approved."""
    member = state.membership.members.get(node_id)
    change = membership.remove(state.membership, node_ids=[node_id], now=now, reason=reason)
    if member is None or not revoke_key:
        return _apply(state, change, node_id=node_id)
    revoked = RevokedKey(public_key=member.public_key, node_id=node_id, revoked_at=now)
    table = dict(state.revoked)
    table[member.public_key] = revoked
    after = replace(state, membership=change.state, revoked=MappingProxyType(table))
    return Outcome(
        after,
        change,
        _delta(state, after, change, revoked_up=(revoked,)),
        node_id=node_id,
        accounts_remove=(node_id,),
    )


def approve_key(state: CoreState, public_key: str) -> Outcome:
    """Let a revoked key enroll again (with a join token); `ignored` when it was not revoked."""
    if public_key not in state.revoked:
        return _nothing(state, ignored="that key is not revoked")
    table = {k: v for k, v in state.revoked.items() if k != public_key}
    after = replace(state, revoked=MappingProxyType(table))
    return Outcome(after, Change(state.membership), Delta(delete_revoked=(public_key,)))


def create_token(
    state: CoreState,
    *,
    secret: str,
    now: float,
    ttl_s: float | None = None,
    reusable: bool = False,
    max_uses: int | None = None,
) -> Outcome:
    """Store a new join token (only its hash)."""
    new, token = tokens.create(
        state.tokens, secret=secret, now=now, ttl_s=ttl_s, reusable=reusable, max_uses=max_uses
    )
    return Outcome(
        replace(state, tokens=new), Change(state.membership), Delta(upsert_tokens=(token,)), token=token
    )


def revoke_token(state: CoreState, token_id: str) -> Outcome:
    """Delete a join token; `ignored` is set when no token has that id."""
    new, found = tokens.revoke(state.tokens, token_id)
    if not found:
        return _nothing(state, ignored=f"no token {token_id}")
    return Outcome(replace(state, tokens=new), Change(state.membership), Delta(delete_tokens=(token_id,)))


def with_tokens(state: CoreState, loaded: Tokens) -> CoreState:
    """Adopt the token table as stored (the CLI may add or revoke tokens while the registrar runs)."""
    return replace(state, tokens=loaded)


def restore(
    *,
    members: list[Member],
    join_tokens: list[JoinToken],
    revision: int,
    quarantine: list[Quarantined],
    network: str,
    quarantine_s: float,
    started_at: float,
    revoked: list[RevokedKey] | tuple[RevokedKey, ...] = (),
) -> CoreState:
    """Rebuild the state from what a store loaded; `started_at` (this process's start) opens the grace period."""
    ipam = Ipam.create(
        network,
        quarantine_s=quarantine_s,
        allocated={m.node_id: m.mesh_ip for m in members},
        quarantine=quarantine,
    )
    state = Membership.create(ipam=ipam, started_at=started_at, members=members, revision=revision)
    return CoreState(
        state,
        MappingProxyType({t.id: t for t in join_tokens}),
        MappingProxyType({r.public_key: r for r in revoked}),
    )


def register_payload(state: CoreState, payload: bytes, *, now: float, config: Config, node_id: str) -> Outcome:
    """A RegisterRequest over the HTTP API from the node the API authenticated as `node_id` with its own
    credential: the rules of register/<node_id>, and it may also register a new key (rotation)."""
    return handle_message(
        state, topics.build(config.mesh.mesh, Kind.REGISTER, node_id), payload, now=now, config=config,
        may_rekey=True,
    )  # fmt: skip
