"""Liveness: whether peers should tunnel to a member, judged on both planes. Pure, no I/O.

Every transition takes the current Membership and `now` and returns a Change (registrar.membership), like the
identity transitions there. The model (docs/design.md, "Liveness: both planes"):
- A member is `active` while its heartbeats (or statuses, registrations) of its current epoch arrive. Status and
  heartbeats only count if their epoch is >= the member's current epoch: the will of a session that has since
  re-registered can never take the new session down.
- A goodbye (an offline status that is not a will) makes it `unreachable` at once: it left.
- The control plane losing it (its will, or no heartbeat for `ttl_s`) makes it `suspect` when vouching is on
  (`vouch_wait_s` > 0) and another member is active to vouch; peers keep the tunnel and probe it over the mesh.
  A peer that reaches it vouches in a heartbeat: it is `control_lost` (tunnels kept) while vouches keep coming,
  at least one per TTL. A suspect nobody vouches for within `vouch_wait_s`, or a control-lost member nobody
  vouched for in a TTL, is `unreachable`: peers drop its tunnel (brief rule 5). Without vouching, losing it
  makes it unreachable at once.
- Any heartbeat, online status or registration of its current epoch makes it active again, from any state.
- One unreachable for `expiry_s` (30 days by default) is removed (tombstone) and its IP goes to quarantine.
- Nothing is judged before `started_at + grace_s` (grace >= TTL), so a registrar restart never looks like a
  mass failure.
- A broker that shuts down publishes the last will of every client it disconnects, maybe ours last: wills that
  arrived just before the registrar lost the broker say nothing about the nodes. They are remembered
  (`offline_at`) and forgive_offline() makes those members active again on reconnection; one that really went
  away is then caught by the TTL after the grace period. A goodbye is never taken back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from types import MappingProxyType

from meshcontract.messages import MemberState
from registrar.membership import (
    Change,
    Event,
    Happened,
    Member,
    Membership,
    drop_members,
    next_revision,
    put_members,
)


@dataclass(frozen=True, slots=True)
class LivenessPolicy:
    """How long silence may last before a member is unreachable, then removed; grace after a restart."""

    ttl_s: float
    expiry_s: float
    grace_s: float
    # How long a member the control plane lost stays suspect, waiting for a peer's vouch; 0: no vouching, it is
    # unreachable at once (the control plane alone decides).
    vouch_wait_s: float = 0.0

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.expiry_s <= 0:
            raise ValueError("ttl_s and expiry_s must be > 0")
        if self.vouch_wait_s < 0:
            raise ValueError("vouch_wait_s must be >= 0")
        if self.grace_s < self.ttl_s:
            raise ValueError("grace_s must be >= ttl_s so a restart never races a heartbeat")


def _seen(state: Membership, node_id: str, epoch: int, now: float, what: str) -> Change:
    member = state.members.get(node_id)
    if member is None:
        return Change(state, ignored=f"{what} from unknown node")
    if epoch < member.epoch:
        return Change(state, ignored=f"{what} with stale epoch {epoch} < {member.epoch}")
    if member.state is MemberState.ACTIVE:
        return Change(put_members(state, [replace(member, last_seen=now)]))
    rev = next_revision(state)
    back = _revived(member, now=now, revision=rev)
    return Change(
        put_members(state, [back], revision=rev),
        dirty=(back,),
        published=(back,),
        happened=(Happened(Event.ACTIVE, back, what),),
    )


def _revived(member: Member, *, now: float, revision: int) -> Member:
    return replace(
        member,
        state=MemberState.ACTIVE,
        last_seen=now,
        unreachable_since=None,
        lost_since=None,
        vouched_at=None,
        revision=revision,
        updated_at=now,
    )


def heartbeat(
    state: Membership, *, node_id: str, epoch: int, now: float, alive: tuple[str, ...] | list[str] = ()
) -> Change:
    """A heartbeat of the current (or a newer) epoch refreshes liveness and revives a member that is not active.

    `alive` are the members the sender vouches for: it just reached them over the mesh. Counted only from an
    active member of the current epoch.
    """
    seen = _seen(state, node_id, epoch, now, "heartbeat")
    if not alive or seen.ignored is not None:
        return seen
    vouched = vouch(seen.state, voucher=node_id, alive=alive, now=now)
    if vouched.state is seen.state:
        return seen
    return Change(
        vouched.state,
        dirty=seen.dirty + vouched.dirty,
        published=seen.published + vouched.published,
        happened=seen.happened + vouched.happened,
    )


def vouch(state: Membership, *, voucher: str, alive: tuple[str, ...] | list[str], now: float) -> Change:
    """Active member `voucher` reached `alive` over the mesh: a suspect among them is control-lost (peers keep
    its tunnel), a control-lost one stays so for another TTL. Any other state is left alone: an active member
    needs no vouch, and an unreachable one comes back only by itself (registration, heartbeat)."""
    who = state.members.get(voucher)
    if who is None or who.state is not MemberState.ACTIVE:
        return Change(state, ignored="vouch from a member that is not active")
    suspects = sorted({n for n in alive if n != voucher and n in state.members
                       and state.members[n].state is MemberState.SUSPECT})  # fmt: skip
    renewed = [replace(state.members[n], vouched_at=now) for n in sorted(set(alive))
               if n != voucher and n in state.members and state.members[n].state is MemberState.CONTROL_LOST]  # fmt: skip
    if not suspects and not renewed:
        return Change(state, ignored="vouch for nobody suspect or control-lost")
    if not suspects:
        return Change(put_members(state, renewed))
    rev = next_revision(state)
    kept = [
        replace(state.members[n], state=MemberState.CONTROL_LOST, vouched_at=now, revision=rev, updated_at=now)
        for n in suspects
    ]
    return Change(
        put_members(state, kept + renewed, revision=rev),
        dirty=tuple(kept),
        published=tuple(kept),
        happened=tuple(Happened(Event.CONTROL_LOST, m, f"{voucher} reaches it over the mesh") for m in kept),
    )


def status(
    state: Membership,
    *,
    node_id: str,
    online: bool,
    epoch: int,
    now: float,
    last_will: bool = False,
    vouch_wait_s: float = 0.0,
) -> Change:
    """A node's status (or its will). Offline of the current (or a newer) epoch: a goodbye makes it unreachable
    now; a will makes it suspect (peers probe it, see `vouch`) when `vouch_wait_s` > 0, else unreachable now.

    Only a will (`last_will`) is remembered in `offline_at`, for forgive_offline(): a goodbye is never taken back.
    """
    if online:
        return _seen(state, node_id, epoch, now, "online status")
    member = state.members.get(node_id)
    if member is None:
        return Change(state, ignored="offline status from unknown node")
    if epoch < member.epoch:
        return Change(state, ignored=f"offline status with stale epoch {epoch} < {member.epoch}")
    if member.state is MemberState.UNREACHABLE:
        return Change(state, ignored="offline status for a member already unreachable")
    if not last_will:
        return _unreachable(state, [member], now, "offline status (graceful stop)")
    if member.state is not MemberState.ACTIVE:
        return Change(state, ignored="last will for a member the control plane already lost")
    change = _lost(state, [member], now, "last will (connection lost)", vouch_wait_s=vouch_wait_s)
    offline_at = dict(state.offline_at)
    offline_at[node_id] = now
    return replace(change, state=replace(change.state, offline_at=MappingProxyType(offline_at)), doubtful=True)


def forgive_offline(state: Membership, *, since: float, now: float) -> Change:
    """Make active again every member a last will made unreachable at or after `since`.

    For the registrar's reconnection to the broker: statuses that arrived shortly before it lost the broker
    are the broker's shutdown publishing every will. Each revived member counts as just seen, so one that
    really went away becomes unreachable again a TTL after the grace period. Clears `offline_at`.
    """
    revive = sorted(
        (
            state.members[node]
            for node, at in state.offline_at.items()
            if at >= since
            and node in state.members
            and state.members[node].state is not MemberState.ACTIVE
            and state.members[node].lost_since == at
        ),
        key=lambda m: m.node_id,
    )
    cleared = replace(state, offline_at=MappingProxyType({})) if state.offline_at else state
    if not revive:
        return Change(cleared)
    rev = next_revision(state)
    back = [_revived(m, now=now, revision=rev) for m in revive]
    reason = "its last will came as the broker went away (a stopping broker publishes every client's will)"
    return Change(
        put_members(cleared, back, revision=rev),
        dirty=tuple(back),
        published=tuple(back),
        happened=tuple(Happened(Event.ACTIVE, m, reason) for m in back),
    )


def _lost(state: Membership, members: list[Member], now: float, reason: str, *, vouch_wait_s: float) -> Change:
    """The control plane lost `members` (will, missed TTL): suspect while peers may vouch, else unreachable."""
    # Someone else must stay active to vouch; a lone member (or a mesh lost all at once) gains nothing.
    losing = {m.node_id for m in members}
    vouchers = any(m.state is MemberState.ACTIVE and m.node_id not in losing for m in state.members.values())
    suspect = [m for m in members if vouch_wait_s > 0 and vouchers]
    down = [m for m in members if m not in suspect]
    rev = next_revision(state)
    marked = [
        replace(m, state=MemberState.SUSPECT, lost_since=now, vouched_at=None, revision=rev, updated_at=now)
        for m in suspect
    ]
    marked += [
        replace(m, state=MemberState.UNREACHABLE, unreachable_since=now, lost_since=now, revision=rev, updated_at=now)
        for m in down
    ]
    marked.sort(key=lambda m: m.node_id)
    event = {MemberState.SUSPECT: Event.SUSPECT, MemberState.UNREACHABLE: Event.UNREACHABLE}
    return Change(
        put_members(state, marked, revision=rev),
        dirty=tuple(marked),
        published=tuple(marked),
        happened=tuple(Happened(event[m.state], m, reason) for m in marked),
    )


def _unreachable(state: Membership, members: list[Member], now: float, reason: str) -> Change:
    rev = next_revision(state)
    down = [
        replace(m, state=MemberState.UNREACHABLE, unreachable_since=now, revision=rev, updated_at=now)
        for m in members
    ]
    return Change(
        put_members(state, down, revision=rev),
        dirty=tuple(down),
        published=tuple(down),
        happened=tuple(Happened(Event.UNREACHABLE, m, reason) for m in down),
    )


def _since(at: float | None, started_at: float) -> float:
    # In-memory times (lost_since, vouched_at) start over at a restart, and nothing is heard before the start.
    return max(at or 0.0, started_at)


def deadline(member: Member, *, started_at: float, policy: LivenessPolicy) -> float | None:
    """When the clock next judges `member` as it is now (tick's rules as a time; `due` decides at the boundary).

    None: never, until it changes (unreachable with no time recorded). Heartbeats, vouches and a later
    `started_at` only move it later; a new state may bring it forward (registrar.deadlines relies on both).
    """
    state = member.state
    if state is MemberState.ACTIVE:
        return max(member.last_seen, started_at) + policy.ttl_s
    if state is MemberState.SUSPECT:
        return _since(member.lost_since, started_at) + policy.vouch_wait_s
    if state is MemberState.CONTROL_LOST:
        return _since(member.vouched_at or member.lost_since, started_at) + policy.ttl_s
    if member.unreachable_since is None:
        return None
    return member.unreachable_since + policy.expiry_s


def due(member: Member, *, now: float, started_at: float, policy: LivenessPolicy) -> bool:
    """Whether a tick at `now` (after the grace period) changes `member`: silent for a TTL when active, nobody
    vouched in time when suspect or control-lost, unreachable for `expiry_s`."""
    state = member.state
    if state is MemberState.ACTIVE:
        return now - max(member.last_seen, started_at) > policy.ttl_s
    if state is MemberState.SUSPECT:
        return now - _since(member.lost_since, started_at) >= policy.vouch_wait_s
    if state is MemberState.CONTROL_LOST:
        return now - _since(member.vouched_at or member.lost_since, started_at) > policy.ttl_s
    return member.unreachable_since is not None and now - member.unreachable_since >= policy.expiry_s


def judging(state: Membership, *, now: float, policy: LivenessPolicy) -> bool:
    """Whether the grace period after `started_at` is over: before that, a tick judges nobody."""
    return now >= state.started_at + policy.grace_s


def tick(
    state: Membership, *, now: float, policy: LivenessPolicy, candidates: Iterable[str] | None = None
) -> Change:
    """Apply the clock: expire quarantine; an active member silent for a TTL is lost (suspect, or unreachable
    without vouching); a suspect nobody vouched for within `vouch_wait_s`, or a control-lost one nobody vouched
    for within a TTL, is unreachable; one unreachable for `expiry_s` is removed.

    Within the grace period after `started_at` nobody is marked or removed: members had no chance to
    heartbeat to this process yet (and vouches kept only in memory start over).

    `candidates`: node ids that include every member `due` now (registrar.deadlines.DeadlineQueue.due), so that
    a tick looks at those only; None looks at every member. Either way the result is the same.
    """
    ipam = state.ipam.expire(now=now)
    base = state if ipam is state.ipam else replace(state, ipam=ipam)
    if not judging(state, now=now, policy=policy):
        return Change(base)
    members = base.members
    looked_at = members.values() if candidates is None else [members[n] for n in set(candidates) if n in members]
    started_at = state.started_at
    judged = sorted(
        (m for m in looked_at if due(m, now=now, started_at=started_at, policy=policy)), key=lambda m: m.node_id
    )
    expired = [m for m in judged if m.state is MemberState.UNREACHABLE]
    silent = [m for m in judged if m.state is MemberState.ACTIVE]
    unvouched = [m for m in judged if m.state in (MemberState.SUSPECT, MemberState.CONTROL_LOST)]
    if not expired and not silent and not unvouched:
        return Change(base)
    # One tick is one transition: removals, losses and new unreachables share a single revision.
    rev = next_revision(base)
    after = drop_members(base, expired, now) if expired else base
    lost = _lost(after, silent, now, "", vouch_wait_s=policy.vouch_wait_s).state.members if silent else {}
    changed = [replace(lost[m.node_id], revision=rev) for m in silent]
    silent_ids = {m.node_id for m in silent}
    changed += [
        replace(m, state=MemberState.UNREACHABLE, unreachable_since=now, revision=rev, updated_at=now)
        for m in unvouched
    ]
    after = put_members(after, changed, revision=rev)
    happened = [Happened(Event.REMOVED, m, f"unreachable for {policy.expiry_s:g} s") for m in expired]
    for m in changed:
        if m.node_id in silent_ids:
            event = Event.SUSPECT if m.state is MemberState.SUSPECT else Event.UNREACHABLE
            happened.append(Happened(event, m, f"no heartbeat for {policy.ttl_s:g} s"))
        else:
            happened.append(Happened(Event.UNREACHABLE, m, "no peer reaches it over the mesh either"))
    return Change(
        after, dirty=tuple(changed), published=tuple(changed), removed=tuple(expired), happened=tuple(happened)
    )
