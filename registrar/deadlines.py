"""The liveness deadline queue: which members a tick must look at, so that it does not scan all of them.

Pure: no I/O here and no clock read; callers pass `now`. Unlike the immutable states it is mutable, like the heap
it is, and belongs to the one thread that ticks (registrar.writer).

A heap of (deadline, seq, node id) with lazy invalidation. The invariant: every member whose
registrar.liveness.deadline is not None has one live entry (its newest `seq`) whose key is at most that deadline.
A heartbeat only moves a deadline later, so it costs the queue nothing: the member's old, earlier key is still a
lower bound, and when it comes up `due` looks at the member as it is then and files it again under its real
deadline. What may bring a deadline forward (a new member, a new state: everything in a Change's `dirty`) must
be `note`d, and so must a `started_at` that moved back (a wall clock stepped back across a reconnection): the
queue then rebuilds itself. Entries of removed members, or superseded by an earlier key, are dropped when they
come up.

So a tick costs O((k + 1) log n) for the k entries that came up, instead of O(n): each member comes up about
once per TTL while it heartbeats, not at every tick.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

from registrar import liveness
from registrar.liveness import LivenessPolicy
from registrar.membership import Member, Membership

# Entries come up this much before their key: `due` compares differences (now - since > ttl) where the key is a
# sum (since + ttl), and the two round differently in the last bit. `due` decides; one that is not due yet is
# filed again.
_SLACK_S = 1e-3


class DeadlineQueue:
    """Members by liveness deadline; `due` returns a superset of the members a tick at `now` changes."""

    def __init__(self, policy: LivenessPolicy) -> None:
        self._policy = policy
        self._heap: list[tuple[float, int, str]] = []
        self._live: dict[str, tuple[float, int]] = {}  # node id -> (key, seq) of its live entry
        self._seq = 0
        self._started_at = float("-inf")  # the newest started_at the keys were computed with
        self.looked_at = 0  # entries the last `due` took off the heap (for tests and benchmarks)

    def __len__(self) -> int:
        """Entries in the heap, live or not."""
        return len(self._heap)

    def rebuild(self, members: Mapping[str, Member], *, started_at: float) -> None:
        """File every member again (at start, and when `started_at` moved back)."""
        self._heap, self._live, self._started_at = [], {}, started_at
        for m in members.values():
            key = liveness.deadline(m, started_at=started_at, policy=self._policy)
            if key is not None:
                self._seq += 1
                self._heap.append((key, self._seq, m.node_id))
                self._live[m.node_id] = (key, self._seq)
        heapq.heapify(self._heap)

    def note(self, members: Iterable[Member], *, started_at: float) -> None:
        """Members whose deadline may have come forward (new, or in a new state): file them where it is now."""
        self._started_at = max(self._started_at, started_at)
        for m in members:
            key = liveness.deadline(m, started_at=started_at, policy=self._policy)
            if key is not None:
                self._file(m.node_id, key)

    def due(self, membership: Membership, *, now: float) -> list[str]:
        """The members a tick at `now` must look at: every one `liveness.due` (and maybe a few more, never fewer).

        Each stays filed under its current deadline: the tick that judges it changes its state, and the caller
        notes the change (a tick that could not be committed finds it due again next time).
        """
        members, started_at = membership.members, membership.started_at
        if started_at < self._started_at:
            self.rebuild(members, started_at=started_at)
        self._started_at = started_at
        heap, live, policy = self._heap, self._live, self._policy
        found: list[str] = []
        refile: list[tuple[str, float]] = []
        self.looked_at = 0
        while heap and heap[0][0] <= now + _SLACK_S:
            _, seq, node = heapq.heappop(heap)
            self.looked_at += 1
            if live.get(node, (0.0, -1))[1] != seq:
                continue  # superseded by an earlier key: that entry stands for the member
            member = members.get(node)
            key = None if member is None else liveness.deadline(member, started_at=started_at, policy=policy)
            if key is None:
                del live[node]  # gone, or nothing will happen to it until it changes (and is noted)
                continue
            if liveness.due(member, now=now, started_at=started_at, policy=policy):
                found.append(node)
            refile.append((node, key))  # after the loop: a key not due yet would come up again at once
        for node, key in refile:
            del live[node]
            self._file(node, key)
        return found

    def _compact(self) -> None:
        # Superseded entries wait for their (later) keys to come up: a member that flaps between unreachable
        # (key 30 days ahead) and active leaves one behind per flap. Keep only the live ones.
        self._heap = [(key, seq, node) for node, (key, seq) in self._live.items()]
        heapq.heapify(self._heap)

    def _file(self, node: str, key: float) -> None:
        held = self._live.get(node)
        if held is not None and held[0] <= key:
            return  # the entry it has comes up first: still a lower bound
        self._seq += 1
        heapq.heappush(self._heap, (key, self._seq, node))
        self._live[node] = (key, self._seq)
        if len(self._heap) > 2 * len(self._live) + 64:
            self._compact()
