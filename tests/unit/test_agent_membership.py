"""MembershipSnapshot view: ordering, tombstones, stale rosters, completeness. Table-driven; no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcontract.messages import MemberRecord, MemberState, Roster, RosterEntry
from nodeagent.membership import MembershipSnapshot, MembershipView
from wgctl import keys

KEYS = {n: keys.public_key(keys.generate_private_key()) for n in ("a", "b", "c", "d")}
IPS = {"a": "100.96.0.1", "b": "100.96.0.2", "c": "100.96.0.3", "d": "100.96.0.4"}


def rec(node: str, revision: int, state: MemberState = MemberState.ACTIVE) -> MemberRecord:
    return MemberRecord(
        node_id=node,
        name=f"host-{node}",
        mesh_ip=IPS[node],
        public_key=KEYS[node],
        listen_port=51820,
        state=state,
        revision=revision,
        updated_at=1.0,
    )


def roster(revision: int, **members: int) -> Roster:
    return Roster(
        mesh="m",
        revision=revision,
        published_at=1.0,
        members=[RosterEntry(node_id=n, revision=r) for n, r in sorted(members.items())],
    )


def tomb(node: str) -> tuple[str, str]:
    return ("tombstone", node)


def apply(view: MembershipView, event: object) -> bool:
    if isinstance(event, MemberRecord):
        return view.apply_record(event)
    if isinstance(event, Roster):
        return view.apply_roster(event)
    assert isinstance(event, tuple)
    return view.apply_tombstone(event[1])


def summary(membership: MembershipSnapshot | None) -> tuple[int, dict[str, tuple[int, str]]] | None:
    if membership is None:
        return None
    return membership.revision, {n: (r.revision, r.state.value) for n, r in membership.members.items()}


CASES = [
    pytest.param([], False, None, id="empty view is incomplete and holds nothing"),
    pytest.param([rec("a", 1), rec("b", 2)], False, None, id="records without a roster are not complete"),
    pytest.param([roster(2, a=1, b=2)], False, None, id="roster without records is not complete"),
    pytest.param(
        [rec("a", 1), roster(2, a=1, b=2), rec("b", 2)],
        True,
        (2, {"a": (1, "active"), "b": (2, "active")}),
        id="roster first, records trickle in",
    ),
    pytest.param(
        [roster(2, a=1, b=2), rec("a", 1)],
        False,
        None,
        id="partial view: one record missing",
    ),
    pytest.param(
        [rec("a", 1), rec("b", 2), roster(2, a=1, b=2), roster(1, a=1)],
        True,
        (2, {"a": (1, "active"), "b": (2, "active")}),
        id="stale (lower) roster is ignored",
    ),
    pytest.param(
        [rec("a", 3), rec("a", 1), roster(3, a=3)],
        True,
        (3, {"a": (3, "active")}),
        id="older record is ignored",
    ),
    pytest.param(
        [rec("a", 1), rec("b", 2), roster(2, a=1, b=2), rec("b", 3, MemberState.UNREACHABLE)],
        True,
        (2, {"a": (1, "active"), "b": (3, "unreachable")}),
        id="newer record than the roster entry keeps the view complete",
    ),
    pytest.param(
        [rec("a", 1), rec("b", 2), roster(2, a=1, b=2), roster(4, a=1, b=4)],
        False,
        (2, {"a": (1, "active"), "b": (2, "active")}),
        id="roster ahead of records: incomplete, last complete kept",
    ),
    pytest.param(
        [rec("a", 1), rec("b", 2), roster(2, a=1, b=2), tomb("b")],
        False,
        (2, {"a": (1, "active"), "b": (2, "active")}),
        id="tombstone before the new roster: incomplete, nothing removed yet",
    ),
    pytest.param(
        [rec("a", 1), rec("b", 2), roster(2, a=1, b=2), tomb("b"), roster(3, a=1)],
        True,
        (3, {"a": (1, "active")}),
        id="tombstone then roster without it: removed",
    ),
    pytest.param(
        [rec("a", 1), rec("b", 2), roster(2, a=1, b=2), tomb("b"), rec("b", 2), roster(3, a=1)],
        True,
        (3, {"a": (1, "active")}),
        id="replayed record after its tombstone does not revive it",
    ),
    pytest.param(
        [rec("a", 1), rec("b", 2), roster(2, a=1, b=2), roster(5, a=1)],
        True,
        (5, {"a": (1, "active")}),
        id="missed tombstone: record older than the roster is dropped",
    ),
    pytest.param(
        [rec("a", 1), roster(2, a=1), rec("c", 3)],
        True,
        (2, {"a": (1, "active"), "c": (3, "active")}),
        id="record newer than the roster for an unlisted node counts (added after the roster)",
    ),
]


@pytest.mark.parametrize(("events", "complete", "expected"), CASES)
def test_view(events: list[object], complete: bool, expected: object) -> None:
    view = MembershipView()
    for event in events:
        apply(view, event)
    assert view.is_complete() is complete
    assert summary(view.complete()) == expected


def test_broker_restart_trickle_never_shrinks() -> None:
    """After a broker restart retained state comes back one message at a time: the complete view never
    loses a member on the way."""
    view = MembershipView()
    for event in (rec("a", 1), rec("b", 2), rec("c", 3), roster(3, a=1, b=2, c=3)):
        apply(view, event)
    full = summary(view.complete())
    # The registrar republishes, in any order; every prefix must leave the complete membership as it was.
    for event in (roster(3, a=1, b=2, c=3), rec("c", 3), rec("a", 1), rec("b", 2)):
        apply(view, event)
        assert summary(view.complete()) == full


@pytest.mark.parametrize(
    ("first", "second", "changed"),
    [
        pytest.param(rec("a", 1), rec("a", 1), False, id="same record twice"),
        pytest.param(rec("a", 1), rec("a", 2), True, id="newer record"),
        pytest.param(rec("a", 2), rec("a", 1), False, id="older record"),
        pytest.param(roster(2, a=1), roster(2, a=1), False, id="same roster twice"),
        pytest.param(roster(2, a=1), roster(1, a=1), False, id="older roster"),
        pytest.param(roster(2, a=1), roster(3, a=1), True, id="newer roster"),
    ],
)
def test_apply_reports_change(first: object, second: object, changed: bool) -> None:
    view = MembershipView()
    apply(view, first)
    assert apply(view, second) is changed


def test_tombstone_of_unknown_node_is_no_change() -> None:
    assert MembershipView().apply_tombstone("zz") is False


def test_membership_json_round_trip() -> None:
    view = MembershipView()
    for event in (rec("a", 1), rec("b", 2, MemberState.UNREACHABLE), roster(2, a=1, b=2)):
        apply(view, event)
    membership = view.complete()
    assert membership is not None
    again = MembershipSnapshot.from_json(membership.to_json())
    assert again == membership
    assert [r.node_id for r in again.active()] == ["a"]


@pytest.mark.parametrize(
    "text", ["", "[]", '{"members": []}', '{"revision": -1, "members": []}', '{"revision": 1}']
)
def test_membership_json_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        MembershipSnapshot.from_json(text)


# -- properties over generated registrar histories ----------------------------------------------------------


NODES = ("a", "b", "c", "d")
# One registrar step: for some nodes, set (active/unreachable) or remove them.
STEP = st.dictionaries(
    st.sampled_from(NODES), st.sampled_from(["active", "unreachable", "remove"]), min_size=1
)


def _history(steps: list[dict[str, str]]) -> tuple[list[list[object]], dict[str, tuple[int, str]]]:
    """The messages the registrar publishes for each step (records/tombstones, then the roster) and the
    final membership as node -> (revision, state)."""
    held: dict[str, MemberRecord] = {}
    batches: list[list[object]] = []
    for revision, step in enumerate(steps, start=1):
        batch: list[object] = []
        for node, action in sorted(step.items()):
            if action == "remove":
                if held.pop(node, None) is not None:
                    batch.append(tomb(node))
                continue
            state = MemberState.ACTIVE if action == "active" else MemberState.UNREACHABLE
            held[node] = rec(node, revision, state)
            batch.append(held[node])
        batch.append(roster(revision, **{n: r.revision for n, r in held.items()}))
        batches.append(batch)
    return batches, {n: (r.revision, r.state.value) for n, r in held.items()}


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=6), data=st.data())
def test_stale_replays_never_undo_the_newest_state(steps: list[dict[str, str]], data: st.DataObject) -> None:
    """Live messages arrive in order, interleaved with replays of any earlier message (a reconnect delivers
    old retained state again). The exposed revision never goes back, and the end result is the final state."""
    batches, final = _history(steps)
    live = [m for batch in batches for m in batch]
    view = MembershipView()
    seen_revision = -1
    delivered: list[object] = []
    for message in live:
        # Replays are retained state: records and rosters, never tombstones (an empty retained message is not
        # stored by the broker).
        replayable = [m for m in delivered if not isinstance(m, tuple)]
        replays = data.draw(st.lists(st.sampled_from(replayable), max_size=3)) if replayable else []
        for replay in [*replays, message]:
            apply(view, replay)
            current = view.complete()
            if current is not None:
                assert current.revision >= seen_revision
                seen_revision = current.revision
        delivered.append(message)
    result = summary(view.complete())
    assert result is not None and result[1] == final
