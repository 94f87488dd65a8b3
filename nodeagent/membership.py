"""The agent's membership: a signed snapshot to start from, signed deltas to follow. No I/O here.

The registrar publishes a retained MembershipSnapshot (every member at a revision) and, for every batch of
changes, a MembershipDelta from one revision to the next. An agent is *in sync* when it holds a membership at
revision R and the next delta it sees starts at R. Anything else — a delta from further ahead (a gap: we missed
one, e.g. while disconnected), a fresh connection, a start-up — makes it *syncing*: it asks for the snapshot
(the session subscribes to it), buffers deltas meanwhile, adopts a snapshot no older than what it holds, replays
the buffered deltas that follow it and is in sync again. A membership is therefore always complete, and the
one in force only ever moves forward: an old retained snapshot or a replayed delta changes nothing.

Signatures are checked before anything reaches this module (nodeagent.session with meshcontract.signing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from meshcontract.messages import MemberRecord, MembershipDelta, MembershipSnapshot, MemberState

# Deltas buffered while waiting for a snapshot; beyond this the oldest are dropped (the snapshot then covers
# them, or a later one does).
MAX_BUFFERED_DELTAS = 256


@dataclass(frozen=True, slots=True)
class MemberTable:
    """A complete membership: its revision and every member's record by node id."""

    revision: int
    members: Mapping[str, MemberRecord] = field(default_factory=dict)

    def tunnelled(self) -> list[MemberRecord]:
        """Members peers keep a tunnel to (active, suspect or control-lost), sorted by node id."""
        return [self.members[n] for n in sorted(self.members) if self.members[n].state.tunnelled]

    def probed(self) -> list[MemberRecord]:
        """Members the control plane lost that peers should probe over the mesh (suspect or control-lost)."""
        lost = (MemberState.SUSPECT, MemberState.CONTROL_LOST)
        return [self.members[n] for n in sorted(self.members) if self.members[n].state in lost]

    @classmethod
    def of(cls, snapshot: MembershipSnapshot) -> MemberTable:
        return cls(revision=snapshot.revision, members=MappingProxyType({r.node_id: r for r in snapshot.members}))

    def after(self, delta: MembershipDelta) -> MemberTable:
        """This table with `delta` applied (the caller checked that it starts at our revision)."""
        members = dict(self.members)
        for node_id in delta.removals:
            members.pop(node_id, None)
        for record in delta.upserts:
            members[record.node_id] = record
        return MemberTable(revision=delta.to_revision, members=MappingProxyType(members))

    def to_json(self) -> str:
        """Serialised form for state_dir/membership.json."""
        return json.dumps(
            {
                "revision": self.revision,
                "members": [self.members[n].model_dump(mode="json") for n in sorted(self.members)],
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> MemberTable:
        """Parse what `to_json` wrote; ValueError (incl. pydantic's) if it is not that."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("members"), list):
            raise ValueError("membership file must hold an object with a members list")
        revision = data.get("revision")
        if not isinstance(revision, int) or revision < 0:
            raise ValueError("membership file has no valid revision")
        records = [MemberRecord.model_validate(item, strict=False) for item in data["members"]]
        return cls(revision=revision, members=MappingProxyType({r.node_id: r for r in records}))


class Applied(StrEnum):
    """What a snapshot or delta did to the follower."""

    ADOPTED = "adopted"  # a snapshot became the membership (possibly followed by buffered deltas)
    APPLIED = "applied"  # a delta moved the membership forward
    UNCHANGED = "unchanged"  # in sync already / same revision
    STALE = "stale"  # older than what we hold: ignored
    BUFFERED = "buffered"  # syncing: kept until a snapshot arrives
    GAP = "gap"  # a delta from further ahead: we missed something, now syncing


class MembershipFollower:
    """Follows snapshot + deltas into a MemberTable. Not thread-safe: nodeagent.meshstate serialises access."""

    def __init__(self, start: MemberTable | None = None) -> None:
        self._table = start
        self._syncing = True
        self._buffer: list[MembershipDelta] = []

    @property
    def table(self) -> MemberTable | None:
        """The membership in force (complete), or None before the first snapshot (and with nothing persisted)."""
        return self._table

    @property
    def syncing(self) -> bool:
        """True while a snapshot is needed (the session keeps the snapshot subscription open)."""
        return self._syncing

    def resync(self) -> None:
        """Deltas may have been missed (a new broker connection): wait for a snapshot again."""
        self._syncing = True
        self._buffer.clear()

    def on_snapshot(self, snapshot: MembershipSnapshot) -> Applied:
        held = self._table
        if held is not None and snapshot.revision < held.revision:
            return Applied.STALE
        if held is not None and snapshot.revision == held.revision:
            result = Applied.UNCHANGED
        else:
            self._table = MemberTable.of(snapshot)
            result = Applied.ADOPTED
        self._syncing = False
        buffered, self._buffer = sorted(self._buffer, key=lambda d: d.from_revision), []
        for delta in buffered:
            if self.on_delta(delta) is Applied.APPLIED:
                result = Applied.ADOPTED
        return result

    def on_delta(self, delta: MembershipDelta) -> Applied:
        held = self._table
        if held is not None and delta.to_revision <= held.revision:
            return Applied.STALE
        if self._syncing:
            self._buffer.append(delta)
            del self._buffer[:-MAX_BUFFERED_DELTAS]
            return Applied.BUFFERED
        if held is not None and delta.from_revision == held.revision:
            self._table = held.after(delta)
            return Applied.APPLIED
        self._syncing = True
        self._buffer = [delta]
        return Applied.GAP
