"""The agent's knowledge of the mesh, shared between threads: the followed membership and every record seen.

paho's network thread feeds verified snapshots and deltas in; the reconcile loop reads the membership to apply
and records what it persisted; the local API reads for display. One small lock guards it all and is never held
during I/O. The rules themselves (when a snapshot or delta counts) are the pure nodeagent.membership.
"""

from __future__ import annotations

import threading

from meshcontract.messages import MemberRecord, MembershipDelta, MembershipSnapshot
from nodeagent.membership import Applied, MembershipFollower, MemberTable


class MeshState:
    """Thread-safe: the membership in force (followed from the broker, else the persisted one)."""

    def __init__(self, persisted: MemberTable | None = None) -> None:
        self._lock = threading.Lock()
        self._follower = MembershipFollower(persisted)
        self._persisted = persisted
        # Every record ever seen, by public key: names a removed peer in logs after its record is gone.
        self._known: dict[str, MemberRecord] = {}
        if persisted is not None:
            self._remember(persisted)

    def _remember(self, table: MemberTable) -> None:
        self._known.update({r.public_key: r for r in table.members.values()})

    # -- inputs (paho's thread) -------------------------------------------------------------------------
    def apply_snapshot(self, snapshot: MembershipSnapshot) -> Applied:
        with self._lock:
            result = self._follower.on_snapshot(snapshot)
            if self._follower.table is not None:
                self._remember(self._follower.table)
            return result

    def apply_delta(self, delta: MembershipDelta) -> Applied:
        with self._lock:
            result = self._follower.on_delta(delta)
            self._known.update({r.public_key: r for r in delta.upserts})
            return result

    def resync(self) -> None:
        """A new broker session: deltas may have been missed, so the next snapshot is needed."""
        with self._lock:
            self._follower.resync()

    @property
    def syncing(self) -> bool:
        with self._lock:
            return self._follower.syncing

    # -- outputs ----------------------------------------------------------------------------------------
    def current(self) -> MemberTable | None:
        """The membership reconcile works from (complete; never older than what was persisted)."""
        with self._lock:
            return self._follower.table

    @property
    def persisted(self) -> MemberTable | None:
        with self._lock:
            return self._persisted

    def mark_persisted(self, table: MemberTable) -> None:
        """`table` is now on disk (restart and outage restore from it)."""
        with self._lock:
            self._persisted = table

    def known_by_key(self) -> dict[str, MemberRecord]:
        """A copy of every record ever seen, by public key."""
        with self._lock:
            return dict(self._known)

    def display_records(self) -> list[MemberRecord]:
        """Records to show: those of the membership in force."""
        with self._lock:
            table = self._follower.table
            return list(table.members.values()) if table else []

    def view_status(self) -> tuple[int, bool]:
        """(revision of the membership in force, 0 if none; whether it is in sync with the registrar's stream)."""
        with self._lock:
            table = self._follower.table
            return (table.revision if table else 0), not self._follower.syncing
