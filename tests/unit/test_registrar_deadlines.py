"""The liveness deadline queue (registrar.deadlines): a tick that looks only at members whose deadline came up
decides exactly what the full scan decides, table-driven and on random histories."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_registrar_membership import admit, empty, reg

from meshcontract.messages import MemberState
from registrar import liveness as lv
from registrar import membership as ms
from registrar.deadlines import DeadlineQueue
from registrar.errors import Refused

A, S, C, U = MemberState.ACTIVE, MemberState.SUSPECT, MemberState.CONTROL_LOST, MemberState.UNREACHABLE
TTL, WAIT, EXPIRY, GRACE = 10.0, 3.0, 100.0, 15.0
VOUCHING = lv.LivenessPolicy(ttl_s=TTL, expiry_s=EXPIRY, grace_s=GRACE, vouch_wait_s=WAIT)
PLAIN = lv.LivenessPolicy(ttl_s=TTL, expiry_s=EXPIRY, grace_s=GRACE)
T0 = 20.0  # after the grace period


def mesh(*nodes: str, now: float = T0):
    state = empty()
    for i, node in enumerate(nodes, start=1):
        state = reg(state, node, i, now=now).state
    return state


def join(state, node, k, *, epoch, now):
    """Enroll `node` if it is not a member (a change of its own, as the writer commits it), then register it."""
    changes = []
    if node not in state.members:
        changes.append(admit(state, node, k, now=now))
        state = changes[-1].state
    return [*changes, reg(state, node, k, epoch=epoch, now=now)]


def queue_of(state, policy=VOUCHING) -> DeadlineQueue:
    q = DeadlineQueue(policy)
    q.rebuild(state.members, started_at=state.started_at)
    return q


def apply(q: DeadlineQueue, change):
    """What the writer does after a commit: note the members the change wrote."""
    q.note(change.dirty, started_at=change.state.started_at)
    return change.state


def beat(state, node, now, alive=()):
    return lv.heartbeat(state, node_id=node, epoch=state.members[node].epoch, now=now, alive=list(alive))


def will(state, node, now):
    epoch = state.members[node].epoch
    return lv.status(state, node_id=node, online=False, epoch=epoch, now=now, last_will=True, vouch_wait_s=WAIT)


def bye(state, node, now):
    return lv.status(state, node_id=node, online=False, epoch=state.members[node].epoch, now=now)


# Each case: a history from a mesh of n1, n2, n3 registered at T0 (steps as (what, node, at)), then
# `due(at)` must name exactly these members.
CASES = [
    ("a member comes up a TTL after it was last heard", [], T0 + TTL + 0.5, {"n1", "n2", "n3"}),
    ("nobody before that", [], T0 + TTL - 0.5, set()),
    ("exactly a TTL is not yet silent (strict), the full scan agrees", [], T0 + TTL, set()),
    ("heartbeats move the deadline without telling the queue",
     [("beat", "n1", T0 + 5), ("beat", "n2", T0 + 5)], T0 + TTL + 0.5, {"n3"}),
    ("a will brings it forward: suspect for the vouch wait",
     [("beat", "n1", T0 + 1), ("beat", "n2", T0 + 1), ("will", "n3", T0 + 1)], T0 + 1 + WAIT, {"n3"}),
    ("a vouched member waits a TTL from the vouch",
     [("will", "n3", T0 + 1), ("vouch", "n1", T0 + 2), ("beat", "n2", T0 + 2)], T0 + 2 + TTL - 0.1, set()),
    ("a goodbye waits for the expiry",
     [("bye", "n3", T0 + 1), ("beat", "n1", T0 + EXPIRY), ("beat", "n2", T0 + EXPIRY)], T0 + 1 + EXPIRY, {"n3"}),
    ("a removed member is nobody's business",
     [("remove", "n3", T0 + 1)], T0 + TTL + 0.5, {"n1", "n2"}),
]  # fmt: skip


@pytest.mark.parametrize(("why", "steps", "at", "expected"), CASES, ids=[c[0] for c in CASES])
def test_due_names_exactly_the_members_a_tick_changes(why, steps, at, expected):
    state = mesh("n1", "n2", "n3")
    q = queue_of(state)
    for what, node, when in steps:
        if what == "beat":
            change = beat(state, node, when)
        elif what == "vouch":
            change = beat(state, node, when, alive=["n3"])
        elif what == "will":
            change = will(state, node, when)
        elif what == "bye":
            change = bye(state, node, when)
        else:
            change = ms.remove(state, node_ids=[node], now=when, reason="admin")
        state = apply(q, change)
    assert set(q.due(state, now=at)) == expected
    full = {m.node_id for m in state.members.values() if lv.due(m, now=at, started_at=state.started_at, policy=VOUCHING)}
    assert full == expected


def test_a_member_not_due_at_its_key_is_filed_again_and_found_later():
    state = mesh("n1")
    q = queue_of(state)
    assert q.due(state, now=T0 + TTL) == []  # its key, but silence must exceed the TTL
    assert q.due(state, now=T0 + TTL + 0.001) == ["n1"]


def test_a_member_stays_filed_until_a_tick_changed_it():
    state = mesh("n1", "n2")
    q = queue_of(state, PLAIN)
    assert set(q.due(state, now=T0 + TTL + 1)) == {"n1", "n2"}
    # the tick was not committed (say the store failed): the same members are due next time
    assert set(q.due(state, now=T0 + TTL + 2)) == {"n1", "n2"}
    state = apply(q, lv.tick(state, now=T0 + TTL + 2, policy=PLAIN, candidates=["n1", "n2"]))
    assert {m.state for m in state.members.values()} == {U}
    assert q.due(state, now=T0 + TTL + 3) == []  # unreachable now: next due at the expiry
    assert set(q.due(state, now=T0 + TTL + 2 + EXPIRY)) == {"n1", "n2"}


def test_a_tick_in_a_steady_mesh_looks_at_the_members_whose_deadline_came_up_only():
    nodes = [f"n{i}" for i in range(1, 201)]
    state = mesh(*nodes)
    q = queue_of(state)
    now = T0
    looked = []
    for second in range(1, 61):  # every member heartbeats every 5 s, one tick a second
        now = T0 + second
        for node in nodes[second % 5 :: 5]:
            state = apply(q, beat(state, node, now))
        assert q.due(state, now=now) == []
        looked.append(q.looked_at)
    assert max(looked[: int(TTL) - 1]) == 0  # nothing comes up before the first TTL
    assert looked[int(TTL) - 1] == len(nodes)  # then everyone registered at T0 at once, and is filed again ...
    # ... under its last heartbeat + TTL: from then on each member comes up once per TTL, spread over the ticks
    assert max(looked[int(TTL) :]) <= len(nodes) / 5
    assert sum(looked) <= len(nodes) * 60 / TTL
    assert len(q) <= 2 * len(nodes) + 64


def test_superseded_entries_do_not_pile_up():
    state = mesh("n1", "n2")
    q = queue_of(state)
    now = T0
    for _ in range(500):  # n1 says goodbye (due in 100 s) and comes back (due in a TTL), over and over
        now += 0.5
        state = apply(q, bye(state, "n1", now))
        for change in join(state, "n1", 1, epoch=state.members["n1"].epoch, now=now):
            state = apply(q, change)
        state = beat(state, "n2", now).state
    assert len(q) <= 2 * 2 + 64


def test_a_started_at_moved_back_rebuilds():
    # The keys of a reconnection's started_at are too late for a clock that then stepped back before it.
    state = replace(mesh("n1"), started_at=T0 + 50)
    q = queue_of(state)
    state = replace(state, started_at=T0 - 5)
    assert q.due(state, now=T0 + TTL + 0.5) == ["n1"]


# ---- equivalence with the full scan on random histories ---------------------------------------------------

NODES = "abcdef"
wait = st.tuples(st.just("wait"), st.sampled_from([0.0, 0.001, 0.5, 1.0, WAIT, 5.0, TTL, 10.5, GRACE, EXPIRY, 99.99]))
step = st.one_of(
    st.tuples(st.just("reg"), st.sampled_from(NODES), st.integers(-1, 1)),
    st.tuples(st.just("beat"), st.sampled_from(NODES), st.integers(-1, 1), st.lists(st.sampled_from(NODES), max_size=3)),
    st.tuples(st.just("status"), st.sampled_from(NODES), st.booleans(), st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(NODES)),
    st.tuples(st.just("forgive"), st.sampled_from([0.0, 1.0, 5.0, 30.0])),
    st.tuples(st.just("restart"), st.sampled_from([-20.0, -1.0, 0.0])),  # a reconnection; negative: clock back
    # waits on and off the boundaries (TTL, vouch wait, expiry) and tiny ones; ticks as often as other steps
    wait,
    wait,
    st.tuples(st.just("tick")),
    st.tuples(st.just("tick")),
)  # fmt: skip
# Members first, and past the grace period: otherwise most ticks judge nobody.
history = st.tuples(
    st.lists(st.tuples(st.just("reg"), st.sampled_from(NODES), st.just(1)), min_size=1, max_size=6),
    st.lists(step, min_size=10, max_size=120),
).map(lambda h: [*h[0], ("wait", GRACE), *h[1]])


@settings(max_examples=400, deadline=None)
@given(
    policy=st.sampled_from([VOUCHING, PLAIN, lv.LivenessPolicy(ttl_s=TTL, expiry_s=EXPIRY, grace_s=20, vouch_wait_s=25)]),
    start=st.sampled_from([0.0, 1_700_000_000.123]),  # small times and wall-clock ones (rounding differs)
    steps=history,
)  # fmt: skip
def test_ticks_from_the_queue_decide_exactly_what_the_full_scan_decides(policy, start, steps):
    state = replace(empty(), started_at=start)
    q = queue_of(state, policy)
    now = start
    keys = {n: i for i, n in enumerate(NODES, start=1)}
    for s in steps:
        what = s[0]
        try:
            if what == "reg":
                epoch = max(0, (state.members[s[1]].epoch if s[1] in state.members else 0) + s[2])
                *admitted, change = join(state, s[1], keys[s[1]], epoch=epoch, now=now)
                for joined in admitted:
                    state = apply(q, joined)
            elif what in ("beat", "status") and s[1] not in state.members:
                continue
            elif what == "beat":
                epoch = state.members[s[1]].epoch + s[2]
                change = lv.heartbeat(state, node_id=s[1], epoch=max(0, epoch), now=now, alive=s[3])
            elif what == "status":
                change = lv.status(
                    state, node_id=s[1], online=s[2], epoch=state.members[s[1]].epoch, now=now, last_will=s[3],
                    vouch_wait_s=policy.vouch_wait_s,
                )  # fmt: skip
            elif what == "remove":
                change = ms.remove(state, node_ids=[s[1]], now=now, reason="admin")
            elif what == "forgive":
                change = lv.forgive_offline(state, since=now - s[1], now=now)
            elif what == "restart":
                state = replace(state, started_at=now + s[1])  # as the writer: not a change anyone notes
                continue
            elif what == "wait":
                now += s[1]
                continue
            else:
                full = lv.tick(state, now=now, policy=policy)
                candidates = q.due(state, now=now) if lv.judging(state, now=now, policy=policy) else ()
                assert lv.tick(state, now=now, policy=policy, candidates=candidates) == full
                change = full
        except Refused:
            continue
        state = apply(q, change)
