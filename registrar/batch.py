"""Deciding a drained batch of MQTT messages: engine.handle_message over each, plain heartbeats set aside.

Pure: no I/O here and no clock read; each message carries the `now` the writer read for it.

The state is immutable, so every transition copies the member table, and the writer frees the old one: at 10,000
members that was two thirds of a heartbeat's cost, and 2,000 heartbeats a second (10,000 members every 5 s) kept
the writer a third of a core busy. But most heartbeats change exactly one thing: a heartbeat of the member's
current (or a newer) epoch from an active member, vouching for nobody and reporting no paths, only moves that
member's `last_seen` (registrar.liveness.heartbeat: nothing to store, publish, log or answer). `decide` sets those
aside as `pending` refreshes, applies everything pending before the next message the engine decides, and
returns what is still pending after the batch; `refresh` applies it (one copy of the table), which the writer
does before anything else reads the members (registrar.writer). So every decision sees exactly the state that
folding engine.handle_message over the same messages gives (a property test checks it on random batches).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from pydantic import ValidationError

from meshcontract import access, topics
from meshcontract.errors import ContractError
from meshcontract.messages import MAX_DEPTH, MAX_PAYLOAD, Heartbeat, MemberState
from meshcontract.topics import Kind
from registrar import engine
from registrar.membership import Member, put_members


@dataclass(frozen=True, slots=True)
class Incoming:
    """One MQTT message and when it was read."""

    topic: str
    payload: bytes
    now: float


@dataclass(frozen=True, slots=True)
class Decided:
    """A decided batch: the state after it but for the refreshes still `pending`, and the Outcomes of every
    message but the plain heartbeats."""

    state: engine.CoreState
    outcomes: list[engine.Outcome]  # in the order of their messages
    pending: Mapping[str, Member]  # node id -> the member as its latest plain heartbeat left it (not in `state`)
    refreshed: int = 0  # plain heartbeats in the batch


def _plain_heartbeat(members: Mapping[str, Member], pending: dict[str, Member], msg: Incoming, mesh: str) -> Member | None:
    """The member as a plain heartbeat in `msg` leaves it, or None when the engine must decide `msg`."""
    try:
        parsed = topics.parse(msg.topic)
    except ContractError:
        return None
    node = parsed.node
    if parsed.kind is not Kind.HEARTBEAT or parsed.mesh != mesh or node is None or not access.is_node_id(node):
        return None
    member = pending.get(node) or members.get(node)
    if member is None or member.state is not MemberState.ACTIVE:
        return None
    hb = likely_heartbeat(msg.payload)
    if hb is None or hb.node_id != node or hb.epoch < member.epoch or hb.alive or hb.paths is not None:
        return None
    return replace(member, last_seen=msg.now)


def likely_heartbeat(payload: bytes) -> Heartbeat | None:
    """The Heartbeat in `payload` if messages.decode certainly accepts it (then it is equal to decode's), else None.

    The fast path for the common heartbeat: decode's checks before pydantic (size, nesting depth, json.loads, the
    schema version) cost four times pydantic's own JSON validation, and they only ever reject. A payload within
    the size limit with no more than MAX_DEPTH brackets in all cannot nest deeper; pydantic accepts only a JSON
    object that fits the model (unknown fields forbidden, `v` a Literal, duplicate keys: the last one wins, as in
    json.loads). None is no verdict: the engine then decodes the payload in full, and rejects it with decode's
    reason. A property test checks that whatever this accepts, decode accepts the same.
    """
    if len(payload) > MAX_PAYLOAD or payload.count(b"[") + payload.count(b"{") > MAX_DEPTH:
        return None
    try:
        return Heartbeat.model_validate_json(payload)
    except ValidationError:
        return None


def refresh(state: engine.CoreState, pending: Mapping[str, Member]) -> engine.CoreState:
    """`state` with the `pending` refreshes applied (one copy of the member table); `state` itself if none."""
    if not pending:
        return state
    return replace(state, membership=put_members(state.membership, list(pending.values())))


def decide(
    state: engine.CoreState,
    batch: Sequence[Incoming],
    *,
    config: engine.Config,
    pending: Mapping[str, Member] | None = None,
) -> Decided:
    """engine.handle_message over `batch` in order, after the refreshes `pending` from earlier batches, with the
    plain heartbeats set aside (module docstring): refresh(result.state, result.pending) is the folded state."""
    outcomes: list[engine.Outcome] = []
    waiting = dict(pending or {})
    refreshed = 0
    mesh = config.mesh.mesh
    for msg in batch:
        member = _plain_heartbeat(state.membership.members, waiting, msg, mesh)
        if member is not None:
            waiting[member.node_id] = member
            refreshed += 1
            continue
        state, waiting = refresh(state, waiting), {}
        outcome = engine.handle_message(state, msg.topic, msg.payload, now=msg.now, config=config)
        state = outcome.state
        outcomes.append(outcome)
    return Decided(state, outcomes, waiting, refreshed)
