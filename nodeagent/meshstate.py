"""The agent's knowledge of the mesh, shared between threads: the live view, the persisted snapshot, names.

paho's network thread feeds records and rosters in; the reconcile loop reads the membership to apply and
records what it persisted; the local API reads for display. One small lock guards it all and is never held
during I/O. The rules themselves (what makes a view complete) are the pure nodeagent.membership.
"""

from __future__ import annotations

import threading

from meshcontract.messages import MemberRecord, Roster
from nodeagent.membership import MembershipSnapshot, MembershipView


class MeshState:
    """Thread-safe: the newest complete membership (else the persisted one) and every record ever seen."""

    def __init__(self, persisted: MembershipSnapshot | None = None) -> None:
        self._lock = threading.Lock()
        self._view = MembershipView()
        self._persisted = persisted
        # Every record ever seen, by public key: names a removed peer in logs after its record is gone.
        self._known: dict[str, MemberRecord] = {}
        if persisted is not None:
            self._known.update({r.public_key: r for r in persisted.members.values()})

    # -- inputs (paho's thread). Each returns True if a new complete membership now exists. --------------
    def apply_record(self, record: MemberRecord) -> bool:
        with self._lock:
            before = self._view.complete()
            self._view.apply_record(record)
            self._known[record.public_key] = record
            return self._view.complete() is not before

    def apply_tombstone(self, node_id: str) -> bool:
        with self._lock:
            before = self._view.complete()
            self._view.apply_tombstone(node_id)
            return self._view.complete() is not before

    def apply_roster(self, roster: Roster) -> bool:
        with self._lock:
            before = self._view.complete()
            self._view.apply_roster(roster)
            return self._view.complete() is not before

    # -- outputs ----------------------------------------------------------------------------------------
    def current(self) -> MembershipSnapshot | None:
        """The membership reconcile works from: the newest complete view, else the persisted one."""
        with self._lock:
            return self._view.complete() or self._persisted

    @property
    def persisted(self) -> MembershipSnapshot | None:
        with self._lock:
            return self._persisted

    def mark_persisted(self, snapshot: MembershipSnapshot) -> None:
        """`snapshot` is now on disk (restart and outage restore from it)."""
        with self._lock:
            self._persisted = snapshot

    def known_by_key(self) -> dict[str, MemberRecord]:
        """A copy of every record ever seen, by public key."""
        with self._lock:
            return dict(self._known)

    def display_records(self) -> list[MemberRecord]:
        """Records to show: the current membership's, else whatever partial view is held."""
        with self._lock:
            snapshot = self._view.complete() or self._persisted
            return list(snapshot.members.values()) if snapshot else self._view.records()

    def view_status(self) -> tuple[int, bool]:
        """(roster revision held, or the current snapshot's; whether the live view is complete)."""
        with self._lock:
            revision = self._view.roster_revision
            if revision is None:
                snapshot = self._view.complete() or self._persisted
                revision = snapshot.revision if snapshot else 0
            return revision, self._view.is_complete()
