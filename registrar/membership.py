"""Membership: who is in the mesh, with which key and IP; the state every transition (here and in liveness) builds.

Pure: no I/O here. Every transition takes the current Membership and `now` and returns a Change holding the
new Membership plus what happened (records to persist, records to publish, removals, events to log). The
caller commits a Change to the store before it makes it visible; a refused or ignored input returns the same
Membership object, so nothing is written.

Model (docs/registrar.md has the full story):
- A node becomes a member by enrolling (admit: a join token checked by the caller); from then on it proves
  who it is with its own credential, and each broker session registers (register: may rotate its key, and
  makes it active with a new session `epoch`). Whether peers tunnel to it is registrar.liveness's job.
- One global revision counter: every transition that changes a published record takes the next revision
  and stamps it on every record it changed; the membership revision is that counter and only grows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

from meshcontract.messages import Endpoint, ErrorCode, MemberRecord, MemberState
from registrar.errors import PoolExhausted, Refused
from registrar.ipam import Ipam


@dataclass(frozen=True, slots=True)
class Member:
    """Everything the registrar knows about one member."""

    node_id: str
    name: str
    public_key: str
    mesh_ip: str
    endpoints: tuple[Endpoint, ...]
    listen_port: int
    state: MemberState
    epoch: int
    revision: int  # the revision at which its published record last changed
    joined_at: float
    updated_at: float  # when its published record last changed
    last_seen: float  # last registration, heartbeat or online status of the current epoch (or newer)
    unreachable_since: float | None = None
    # When the control plane lost it (will or missed TTL: suspect) and when a peer last vouched for it. Kept in
    # memory only: after a restart the grace period stands in for both.
    lost_since: float | None = None
    vouched_at: float | None = None
    # Hash of the node's own broker password (meshcontract.access format): what it proves its identity with,
    # on the broker and on the HTTP API. Never published.
    password_hash: str = field(default="", repr=False)

    def record(self) -> MemberRecord:
        """The retained members/<node> payload."""
        return MemberRecord(
            node_id=self.node_id,
            name=self.name,
            mesh_ip=self.mesh_ip,
            public_key=self.public_key,
            endpoints=list(self.endpoints),
            listen_port=self.listen_port,
            state=self.state,
            revision=self.revision,
            updated_at=self.updated_at,
        )

    def published_fields(self) -> tuple:
        """What peers see; a change here needs a new revision."""
        return (self.name, self.mesh_ip, self.public_key, self.endpoints, self.listen_port, self.state)


class Event(StrEnum):
    """Membership events, logged at INFO with the member's node_id, name and mesh_ip."""

    JOINED = "member joined"
    UPDATED = "member updated"
    KEY_ROTATED = "member key rotated"
    ACTIVE = "member active"
    SUSPECT = "member suspect"
    CONTROL_LOST = "member control plane lost, tunnels alive"
    UNREACHABLE = "member unreachable"
    REMOVED = "member removed"


@dataclass(frozen=True, slots=True)
class Happened:
    """One event and the member it concerns (as it is after the event; as it was for removals)."""

    event: Event
    member: Member
    reason: str


@dataclass(frozen=True, slots=True)
class Membership:
    """The whole membership state. Treat as immutable: transitions build new ones."""

    members: Mapping[str, Member]
    keys: Mapping[str, str]  # public key -> node id
    ipam: Ipam
    revision: int
    started_at: float  # when this registrar process started: the grace period counts from here
    # Members made unreachable by a last will -> when. Not persisted: it only matters
    # across one broker reconnection. An entry is stale once the member changed state again.
    offline_at: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def create(
        cls,
        *,
        ipam: Ipam,
        started_at: float,
        members: list[Member] | tuple[Member, ...] = (),
        revision: int = 0,
    ) -> Membership:
        """A Membership from stored members; `ipam` must already hold their addresses."""
        by_id = {m.node_id: m for m in members}
        keys = {m.public_key: m.node_id for m in members}
        if len(keys) != len(by_id):
            raise ValueError("two members share a public key")
        for m in members:
            if ipam.ip_of(m.node_id) != m.mesh_ip:
                raise ValueError(
                    f"member {m.node_id} holds {m.mesh_ip} but ipam says {ipam.ip_of(m.node_id)}"
                )
        revision = max([revision, *(m.revision for m in members)])
        return cls(MappingProxyType(by_id), MappingProxyType(keys), ipam, revision, started_at)

    def records(self) -> list[MemberRecord]:
        """Every member's published record, sorted by node id (what a membership snapshot carries)."""
        return [self.members[i].record() for i in sorted(self.members)]

    def count(self, state: MemberState) -> int:
        return sum(1 for m in self.members.values() if m.state is state)


@dataclass(frozen=True, slots=True)
class Change:
    """The result of a transition. `state is before` (identity) means nothing changed at all."""

    state: Membership
    dirty: tuple[Member, ...] = ()  # members whose stored row changed (persist)
    published: tuple[Member, ...] = ()  # members whose record changed (publish; subset of dirty)
    removed: tuple[Member, ...] = ()  # members gone (persist delete, publish tombstone)
    happened: tuple[Happened, ...] = ()
    ignored: str | None = None  # why an input had no effect, for logs and metrics
    joined: bool = False  # a registration admitted a new member (the caller must redeem a join token)
    # Only a last will changed something: a hint the registrar may take back within moments (a stopping broker
    # publishes every will), so its publication is held back briefly.
    doubtful: bool = False

    @property
    def revision_bumped(self) -> bool:
        return bool(self.published or self.removed)


def next_revision(state: Membership) -> int:
    return state.revision + 1


def put_members(state: Membership, members: list[Member], *, revision: int | None = None, **kw) -> Membership:
    by_id = state.members.copy()  # MappingProxyType.copy(): a fast C dict copy; dict(proxy) is ~20x slower
    for m in members:
        by_id[m.node_id] = m
    return replace(state, members=MappingProxyType(by_id), revision=revision or state.revision, **kw)


def register(
    state: Membership,
    *,
    node_id: str,
    name: str,
    public_key: str,
    endpoints: tuple[Endpoint, ...],
    listen_port: int,
    epoch: int,
    now: float,
    revoked: Mapping[str, float] = MappingProxyType({}),
    may_rekey: bool = True,
) -> Change:
    """Refresh an existing member at the start of one of its sessions. Idempotent: same IP, same record.

    The caller has authenticated the sender as `node_id` (the broker admitted it with that node's credential,
    or the HTTP API checked it). A `public_key` other than the member's is a key rotation: the mesh IP stays,
    peers swap the key. Refused NOT_ENROLLED for an unknown node (it must enroll with a join token),
    KEY_CONFLICT if the new key belongs to another member, KEY_REVOKED if an admin revoked it, REKEY_OVER_HTTPS for a
    new key when not `may_rekey` (it came through the broker), INVALID_REQUEST for an epoch older than the
    member's current one (a replayed request).
    """
    existing = state.members.get(node_id)
    if existing is None:
        raise Refused(ErrorCode.NOT_ENROLLED, f"node {node_id} is not a member: enroll with a join token")
    if epoch < existing.epoch:
        raise Refused(ErrorCode.INVALID_REQUEST, f"stale epoch {epoch}: the current session is {existing.epoch}")
    rotating = public_key != existing.public_key
    keys = state.keys
    if rotating and not may_rekey:
        raise Refused(
            ErrorCode.REKEY_OVER_HTTPS,
            "a new WireGuard key is registered over HTTPS with the node's own credential, not through the broker",
        )
    if rotating:
        owner = state.keys.get(public_key)
        if owner is not None:
            raise Refused(ErrorCode.KEY_CONFLICT, f"this public key is already registered as node {owner}")
        if public_key in revoked:
            raise Refused(ErrorCode.KEY_REVOKED, "this public key was revoked by an admin")
        new_keys = {k: v for k, v in state.keys.items() if k != existing.public_key}
        new_keys[public_key] = node_id
        keys = MappingProxyType(new_keys)
    refreshed = replace(
        existing,
        name=name,
        public_key=public_key,
        endpoints=endpoints,
        listen_port=listen_port,
        state=MemberState.ACTIVE,
        epoch=epoch,
        last_seen=now,
        unreachable_since=None,
        lost_since=None,
        vouched_at=None,
    )
    if refreshed.published_fields() == existing.published_fields():
        # Same record: persist only when the epoch moved (it decides which wills count after a restart).
        dirty = (refreshed,) if refreshed.epoch != existing.epoch else ()
        return Change(put_members(state, [refreshed]), dirty=dirty)
    rev = next_revision(state)
    refreshed = replace(refreshed, revision=rev, updated_at=now)
    events = []
    if existing.state is not MemberState.ACTIVE:
        events.append(Happened(Event.ACTIVE, refreshed, "re-registered"))
    if rotating:
        events.append(Happened(Event.KEY_ROTATED, refreshed, "registered with a new WireGuard key"))
    elif refreshed.published_fields()[:-1] != existing.published_fields()[:-1]:
        events.append(Happened(Event.UPDATED, refreshed, "registration changed its record"))
    return Change(
        put_members(state, [refreshed], revision=rev, keys=keys),
        dirty=(refreshed,),
        published=(refreshed,),
        happened=tuple(events),
    )


def _joined_reason(state: Membership, member: Member) -> str:
    # Names are display aliases and may repeat; say so at join, where the operator is looking.
    same = sorted(m.node_id for m in state.members.values() if m.name == member.name)
    return f"enrolled; its name is also used by {', '.join(same)}" if same else "enrolled"


def admit(
    state: Membership,
    *,
    node_id: str,
    name: str,
    public_key: str,
    endpoints: tuple[Endpoint, ...],
    listen_port: int,
    password_hash: str,
    now: float,
) -> Change:
    """Make a new member (an enrollment the caller has checked: valid token, key not revoked).

    Refused KEY_CONFLICT if the node id or the key is already a member's (a join token never takes over an
    existing identity), POOL_EXHAUSTED when no address is free. The member starts active at epoch 0: its first
    broker session registers with a real epoch.
    """
    if node_id in state.members:
        raise Refused(ErrorCode.KEY_CONFLICT, f"node id {node_id} is already enrolled")
    owner = state.keys.get(public_key)
    if owner is not None:
        raise Refused(ErrorCode.KEY_CONFLICT, f"this public key is already registered as node {owner}")
    try:
        ipam, ip = state.ipam.allocate(node_id, now=now)
    except PoolExhausted as exc:
        raise Refused(ErrorCode.POOL_EXHAUSTED, str(exc)) from exc
    rev = next_revision(state)
    member = Member(
        node_id=node_id,
        name=name,
        public_key=public_key,
        mesh_ip=ip,
        endpoints=endpoints,
        listen_port=listen_port,
        state=MemberState.ACTIVE,
        epoch=0,
        revision=rev,
        joined_at=now,
        updated_at=now,
        last_seen=now,
        password_hash=password_hash,
    )
    keys = state.keys.copy()
    keys[public_key] = node_id
    new = put_members(state, [member], revision=rev, ipam=ipam, keys=MappingProxyType(keys))
    return Change(
        new,
        dirty=(member,),
        published=(member,),
        happened=(Happened(Event.JOINED, member, _joined_reason(state, member)),),
        joined=True,
    )


def drop_members(state: Membership, gone: list[Member], now: float) -> Membership:
    by_id = state.members.copy()  # MappingProxyType.copy(): a fast C dict copy; dict(proxy) is ~20x slower
    keys = state.keys.copy()
    ipam = state.ipam
    for m in gone:
        del by_id[m.node_id]
        keys.pop(m.public_key, None)
        ipam = ipam.release(m.node_id, now=now)
    offline_at = state.offline_at
    if any(m.node_id in offline_at for m in gone):
        offline_at = MappingProxyType({k: v for k, v in state.offline_at.items() if k in by_id})
    return replace(
        state, members=MappingProxyType(by_id), keys=MappingProxyType(keys), ipam=ipam, offline_at=offline_at
    )


def remove(state: Membership, *, node_ids: list[str] | tuple[str, ...], now: float, reason: str) -> Change:
    """Remove members (expiry or admin): tombstone their records, quarantine their IPs, free their keys."""
    gone = [state.members[i] for i in node_ids if i in state.members]
    if not gone:
        return Change(state, ignored="no such member")
    new = replace(drop_members(state, gone, now), revision=next_revision(state))
    return Change(new, removed=tuple(gone), happened=tuple(Happened(Event.REMOVED, m, reason) for m in gone))


