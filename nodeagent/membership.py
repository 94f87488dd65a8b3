"""The agent's view of mesh membership, built from retained MQTT messages. No I/O here.

The registrar publishes one retained MemberRecord per member (an empty payload is a tombstone) and a retained
Roster listing every member with its record revision. Messages arrive in any order, may be stale (an old
retained record next to a newer roster) and after a broker restart trickle in one by one. The view therefore
only ever hands out a *complete* membership: a roster plus, for every entry, a record at least that new. Until
a newer complete state exists, the last complete one stays in force, so a partial view never removes peers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshcontract.messages import MemberRecord, MemberState, Roster


@dataclass(frozen=True, slots=True)
class MembershipSnapshot:
    """A complete membership: the roster revision it was built from and every member's record by node id."""

    revision: int
    members: Mapping[str, MemberRecord] = field(default_factory=dict)

    def active(self) -> list[MemberRecord]:
        """Members the registrar considers alive, sorted by node id."""
        return [self.members[n] for n in sorted(self.members) if self.members[n].state is MemberState.ACTIVE]

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
    def from_json(cls, text: str) -> MembershipSnapshot:
        """Parse what `to_json` wrote; ValueError (incl. pydantic's) if it is not that."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("members"), list):
            raise ValueError("membership file must hold an object with a members list")
        revision = data.get("revision")
        if not isinstance(revision, int) or revision < 0:
            raise ValueError("membership file has no valid revision")
        records = [MemberRecord.model_validate(item, strict=False) for item in data["members"]]
        return cls(revision=revision, members=MappingProxyType({r.node_id: r for r in records}))


class MembershipView:
    """Applies member records, tombstones and rosters; exposes the newest complete membership.

    Not thread-safe: the agent serialises access with a lock. Every `apply_*` returns True if the held
    state changed, so the caller knows when to wake the reconcile loop.
    """

    def __init__(self) -> None:
        self._records: dict[str, MemberRecord] = {}
        # node id -> revision of the record a tombstone removed: an older (replayed) record must not revive it.
        self._tombstones: dict[str, int] = {}
        self._roster: Roster | None = None
        self._complete: MembershipSnapshot | None = None

    # -- inputs -----------------------------------------------------------------------------------------
    def apply_record(self, record: MemberRecord) -> bool:
        """Take `record` unless we hold one at least as new for that node (or a tombstone after it)."""
        held = self._records.get(record.node_id)
        if held is not None and record.revision < held.revision:
            return False
        if held == record:
            return False
        if held is None and record.revision <= self._tombstones.get(record.node_id, -1):
            return False
        self._records[record.node_id] = record
        self._tombstones.pop(record.node_id, None)
        self._refresh()
        return True

    def apply_tombstone(self, node_id: str) -> bool:
        """Forget `node_id`'s record (the registrar removed the member)."""
        held = self._records.pop(node_id, None)
        if held is None:
            return False
        self._tombstones[node_id] = held.revision
        self._refresh()
        return True

    def apply_roster(self, roster: Roster) -> bool:
        """Take `roster` unless the one we hold is newer."""
        if self._roster is not None and roster.revision < self._roster.revision:
            return False
        if self._roster == roster:
            return False
        self._roster = roster
        self._refresh()
        return True

    # -- outputs ----------------------------------------------------------------------------------------
    @property
    def roster_revision(self) -> int | None:
        """Revision of the roster held, None before the first one arrives."""
        return None if self._roster is None else self._roster.revision

    def is_complete(self) -> bool:
        """True if we hold a roster and, for every entry, a record at least as new as the entry says."""
        if self._roster is None:
            return False
        for entry in self._roster.members:
            record = self._records.get(entry.node_id)
            if record is None or record.revision < entry.revision:
                return False
        return True

    def complete(self) -> MembershipSnapshot | None:
        """The newest complete membership seen so far (possibly older than what is held now), or None."""
        return self._complete

    def record(self, node_id: str) -> MemberRecord | None:
        """The record held for `node_id`, complete view or not."""
        return self._records.get(node_id)

    def records(self) -> list[MemberRecord]:
        """Every record held, sorted by node id (for display; not necessarily complete)."""
        return [self._records[n] for n in sorted(self._records)]

    # -- internals --------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        if not self.is_complete():
            return
        assert self._roster is not None
        members = {entry.node_id: self._records[entry.node_id] for entry in self._roster.members}
        # A record newer than the roster for a node the roster does not list yet was added after the roster
        # was published; one that is older was removed by then (its tombstone may have been missed while we
        # were disconnected) and must not count.
        for node_id, record in self._records.items():
            if node_id not in members and record.revision > self._roster.revision:
                members[node_id] = record
        self._complete = MembershipSnapshot(revision=self._roster.revision, members=MappingProxyType(members))
