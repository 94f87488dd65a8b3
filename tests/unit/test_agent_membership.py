"""nodeagent.membership: following a signed snapshot and deltas. Table-driven plus a property test; no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcontract.messages import MemberRecord, MembershipDelta, MembershipSnapshot, MemberState
from nodeagent.membership import MAX_BUFFERED_DELTAS, Applied, MembershipFollower, MemberTable
from wgctl import keys

NODES = ("a", "b", "c", "d")
KEYS = {n: keys.public_key(keys.generate_private_key()) for n in NODES}
IPS = {n: f"100.96.0.{i + 1}" for i, n in enumerate(NODES)}


def rec(node: str, revision: int, state: MemberState = MemberState.ACTIVE) -> MemberRecord:
    return MemberRecord(
        node_id=node, name=f"host-{node}", mesh_ip=IPS[node], public_key=KEYS[node], listen_port=51820,
        state=state, revision=revision, updated_at=1.0,
    )  # fmt: skip


def snap(revision: int, *nodes: str) -> MembershipSnapshot:
    return MembershipSnapshot(
        mesh="m", revision=revision, members=[rec(n, revision) for n in nodes], published_at=1.0
    )


def delta(start: int, end: int, *, up: tuple[str, ...] = (), down: tuple[str, ...] = ()) -> MembershipDelta:
    return MembershipDelta(
        mesh="m", from_revision=start, to_revision=end, upserts=[rec(n, end) for n in up],
        removals=list(down), published_at=1.0,
    )  # fmt: skip


def feed(follower: MembershipFollower, event: object) -> Applied:
    if isinstance(event, MembershipSnapshot):
        return follower.on_snapshot(event)
    if event == "resync":
        follower.resync()
        return Applied.UNCHANGED
    assert isinstance(event, MembershipDelta)
    return follower.on_delta(event)


def summary(table: MemberTable | None) -> tuple[int, list[str]] | None:
    return None if table is None else (table.revision, sorted(table.members))


CASES = [
    pytest.param(None, [], [], None, True, id="nothing yet: no membership, syncing"),
    pytest.param(None, [snap(3, "a", "b")], ["adopted"], (3, ["a", "b"]), False, id="first snapshot adopted"),
    pytest.param(
        None, [snap(3, "a", "b"), delta(3, 4, up=("c",))], ["adopted", "applied"], (4, ["a", "b", "c"]), False,
        id="in sync: the next delta applies",
    ),
    pytest.param(
        None, [snap(3, "a", "b"), delta(3, 5, down=("b",))], ["adopted", "applied"], (5, ["a"]), False,
        id="a delta removes a member",
    ),
    pytest.param(
        None, [snap(3, "a"), delta(4, 5, up=("b",))], ["adopted", "gap"], (3, ["a"]), True,
        id="a delta from further ahead is a gap: syncing, nothing changes",
    ),
    pytest.param(
        None, [snap(3, "a"), delta(2, 3, up=("b",))], ["adopted", "stale"], (3, ["a"]), False,
        id="a replayed old delta changes nothing",
    ),
    pytest.param(
        None, [snap(5, "a", "b"), snap(4, "a")], ["adopted", "stale"], (5, ["a", "b"]), False,
        id="an older snapshot (stale retained) is ignored",
    ),
    pytest.param(
        None, [delta(3, 4, up=("c",)), snap(3, "a")], ["buffered", "adopted"], (4, ["a", "c"]), False,
        id="deltas seen while syncing are replayed after the snapshot",
    ),
    pytest.param(
        None, [delta(5, 6, up=("c",)), snap(3, "a")], ["buffered", "adopted"], (3, ["a"]), True,
        id="a buffered delta that does not follow the snapshot: still syncing",
    ),
    pytest.param(
        MemberTable(7, {}), [snap(6, "a")], ["stale"], (7, []), True,
        id="never older than the persisted membership",
    ),
    pytest.param(
        None, [snap(3, "a"), "resync", delta(3, 4, up=("b",)), snap(4, "a", "b")],
        ["adopted", "unchanged", "buffered", "adopted"], (4, ["a", "b"]), False,
        id="a new connection resyncs: deltas wait for the snapshot",
    ),
    pytest.param(
        None, [snap(3, "a"), "resync", snap(3, "a")], ["adopted", "unchanged", "unchanged"], (3, ["a"]), False,
        id="the same snapshot again ends syncing without a change",
    ),
]


@pytest.mark.parametrize(("start", "events", "results", "expected", "syncing"), CASES)
def test_follower(start, events, results, expected, syncing) -> None:
    follower = MembershipFollower(start)
    got = [feed(follower, e).value for e in events]
    assert got == results
    assert summary(follower.table) == expected
    assert follower.syncing is syncing


def test_buffer_is_bounded() -> None:
    follower = MembershipFollower()
    for i in range(MAX_BUFFERED_DELTAS + 50):
        follower.on_delta(delta(i, i + 1, up=("a",)))
    assert follower.on_snapshot(snap(MAX_BUFFERED_DELTAS + 49, "b")) is Applied.ADOPTED
    assert summary(follower.table) == (MAX_BUFFERED_DELTAS + 50, ["a", "b"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(lambda r, n: snap(r, *n), st.integers(0, 12), st.sets(st.sampled_from(NODES))),
            st.builds(
                lambda r, k, up, down: delta(r, r + k, up=tuple(up), down=tuple(down)),
                st.integers(0, 12), st.integers(1, 3), st.sets(st.sampled_from(NODES)),
                st.sets(st.sampled_from(NODES)),
            ),
            st.just("resync"),
        ),
        max_size=30,
    )
)
def test_revision_never_goes_back(events: list[object]) -> None:
    """Whatever arrives, in whatever order: the membership in force only ever moves forward."""
    follower = MembershipFollower()
    revisions = []
    for event in events:
        feed(follower, event)
        if follower.table is not None:
            revisions.append(follower.table.revision)
    assert revisions == sorted(revisions)


def test_table_json_round_trip() -> None:
    table = MemberTable.of(snap(9, "a", "c"))
    assert MemberTable.from_json(table.to_json()) == table
