"""The membership stream's messages: a snapshot of everything, and deltas between revisions. Pure: no I/O here.

Agents start from the retained snapshot and then apply deltas in revision order (nodeagent.membership); a
delta names the revisions it goes between, so an agent that missed one notices and resynchronises from the
snapshot instead of acting on an incomplete view. Both are signed by the registrar (registrar.broker_link).
"""

from __future__ import annotations

from collections.abc import Iterable

from meshcontract.messages import MembershipDelta, MembershipSnapshot
from registrar.membership import Membership


def snapshot(membership: Membership, *, mesh: str, now: float) -> MembershipSnapshot:
    """Every member's record at the membership's revision (unsigned)."""
    return MembershipSnapshot(mesh=mesh, revision=membership.revision, members=membership.records(), published_at=now)


def delta(
    membership: Membership, *, mesh: str, from_revision: int, changed: Iterable[str], now: float
) -> MembershipDelta | None:
    """The changes from `from_revision` to now, given every node whose record changed or that left since then.

    None when the revision did not move (nothing for agents to apply).
    """
    if membership.revision <= from_revision:
        return None
    changed = sorted(set(changed))
    members = membership.members
    return MembershipDelta(
        mesh=mesh,
        from_revision=from_revision,
        to_revision=membership.revision,
        upserts=[members[n].record() for n in changed if n in members],
        removals=[n for n in changed if n not in members],
        published_at=now,
    )
