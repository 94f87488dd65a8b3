"""Membership transitions and liveness, table-driven, plus a property test over random event sequences."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcontract.messages import Endpoint, ErrorCode, MemberState
from registrar import liveness as lv
from registrar import membership as ms
from registrar.errors import Refused
from registrar.ipam import Ipam

POLICY = lv.LivenessPolicy(ttl_s=10, expiry_s=100, grace_s=15)


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def empty(started_at: float = 0.0) -> ms.Membership:
    return ms.Membership.create(ipam=Ipam.create("10.1.0.0/24", quarantine_s=50), started_at=started_at)


def admit(state, node="n1", k=1, *, now=1.0, port=51820):
    return ms.admit(
        state,
        node_id=node,
        name=node,
        public_key=key(k),
        endpoints=(Endpoint(host="192.0.2.1", port=port),),
        listen_port=port,
        password_hash="$7$hash",
        now=now,
    )


def reg(state, node="n1", k=1, *, epoch=1, now=1.0, name=None, port=51820):
    """Register `node` (admitting it first, with key `k`, if it is not a member yet)."""
    if node not in state.members:
        state = admit(state, node, k, now=now, port=port).state
    return ms.register(
        state,
        node_id=node,
        name=name or node,
        public_key=key(k),
        endpoints=(Endpoint(host="192.0.2.1", port=port),),
        listen_port=port,
        epoch=epoch,
        now=now,
    )


def test_admit_new_member():
    change = admit(empty())
    m = change.state.members["n1"]
    assert (m.mesh_ip, m.state, m.epoch, m.revision) == ("10.1.0.1", MemberState.ACTIVE, 0, 1)
    assert change.joined and change.published == (m,) and change.dirty == (m,)
    assert [h.event for h in change.happened] == [ms.Event.JOINED]
    assert change.state.revision == 1 and m.password_hash == "$7$hash"
    assert "$7$hash" not in repr(m) and "password" not in m.record().model_dump(), "never published"


def test_register_starts_a_session_of_an_admitted_member():
    change = reg(empty(), epoch=3)
    m = change.state.members["n1"]
    assert (m.mesh_ip, m.epoch, m.revision) == ("10.1.0.1", 3, 1) and not change.joined
    assert change.dirty and not change.published, "the epoch is persisted, the record did not change"


def test_reregistration_is_idempotent():
    first = reg(empty()).state
    again = reg(first, now=5.0)
    assert not again.joined and not again.published and not again.dirty
    assert again.state.members["n1"].mesh_ip == "10.1.0.1"
    assert again.state.revision == 1
    assert again.state.members["n1"].last_seen == 5.0


def test_reregistration_with_new_epoch_is_persisted_not_published():
    first = reg(empty()).state
    again = reg(first, epoch=2, now=5.0)
    assert again.dirty and not again.published and again.state.revision == 1


def test_reregistration_with_new_endpoint_bumps_revision():
    first = reg(empty()).state
    again = reg(first, port=51821, now=5.0)
    assert again.published[0].revision == 2 and again.state.revision == 2
    assert [h.event for h in again.happened] == [ms.Event.UPDATED]


@pytest.mark.parametrize(
    ("node", "k", "code"),
    [
        ("n1", 2, ErrorCode.KEY_CONFLICT),  # an enrolled id, whatever the key: a token never takes it over
        ("n2", 1, ErrorCode.KEY_CONFLICT),  # same key, other id
    ],
)
def test_admit_refusals(node, k, code):
    state = reg(empty()).state
    with pytest.raises(Refused) as err:
        admit(state, node, k)
    assert err.value.code is code


@pytest.mark.parametrize(
    ("node", "k", "epoch", "code"),
    [
        ("n2", 2, 1, ErrorCode.NOT_ENROLLED),
        ("n1", 2, 1, ErrorCode.KEY_CONFLICT),  # rotating onto n2's key
        ("n1", 1, 0, ErrorCode.INVALID_REQUEST),  # replay of an older session
    ],
)
def test_register_refusals(node, k, epoch, code):
    state = reg(reg(empty()).state, "n2", 2).state
    if node == "n2" and code is ErrorCode.NOT_ENROLLED:
        state = reg(empty()).state
    with pytest.raises(Refused) as err:
        ms.register(
            state, node_id=node, name=node, public_key=key(k), endpoints=(), listen_port=1, epoch=epoch, now=2.0
        )
    assert err.value.code is code


def test_pool_exhausted():
    state = ms.Membership.create(ipam=Ipam.create("10.1.0.0/30", quarantine_s=50), started_at=0)
    state = reg(state, "a", 1).state
    state = reg(state, "b", 2).state
    with pytest.raises(Refused) as err:
        admit(state, "c", 3)
    assert err.value.code is ErrorCode.POOL_EXHAUSTED


# (event, args) applied after registering n1 with epoch 2 at t=1; expected state and whether a record changed.
@pytest.mark.parametrize(
    ("events", "state_after", "published"),
    [
        ([("status", False, 2, 3)], MemberState.UNREACHABLE, True),
        ([("status", False, 1, 3)], MemberState.ACTIVE, False),  # stale will ignored
        ([("status", False, 3, 3)], MemberState.UNREACHABLE, True),  # a newer session going down
        ([("status", False, 2, 3), ("hb", 2, 4)], MemberState.ACTIVE, True),  # heartbeat revives
        ([("status", False, 2, 3), ("hb", 1, 4)], MemberState.UNREACHABLE, False),  # stale heartbeat no
        ([("status", False, 2, 3), ("status", True, 2, 4)], MemberState.ACTIVE, True),
        ([("hb", 2, 9), ("tick", 18.5)], MemberState.ACTIVE, False),  # heard at 9, ttl 10
        ([("hb", 2, 9), ("tick", 19)], MemberState.ACTIVE, False),  # exactly the TTL: not yet
        ([("hb", 2, 9), ("tick", 19.5)], MemberState.UNREACHABLE, True),
        ([("hb", 2, 16), ("tick", 26.5)], MemberState.UNREACHABLE, True),
        ([("hb", 1, 16), ("tick", 26.5)], MemberState.UNREACHABLE, True),  # stale heartbeat did not refresh
    ],
)
def test_liveness_table(events, state_after, published):
    state = reg(empty(), epoch=2).state
    last = None
    for ev in events:
        if ev[0] == "status":
            last = lv.status(state, node_id="n1", online=ev[1], epoch=ev[2], now=ev[3])
        elif ev[0] == "hb":
            last = lv.heartbeat(state, node_id="n1", epoch=ev[1], now=ev[2])
        else:
            last = lv.tick(state, now=ev[1], policy=POLICY)
        state = last.state
    assert state.members["n1"].state is state_after
    assert bool(last.published) is published


@pytest.mark.parametrize(
    ("started_at", "now", "expected"),
    [
        (0, 14, MemberState.ACTIVE),  # within grace: not yet
        (0, 15.5, MemberState.UNREACHABLE),
        (100, 114, MemberState.ACTIVE),  # a restart at 100 with stale last_seen=1: still grace
        (100, 115, MemberState.UNREACHABLE),
    ],
)
def test_restart_grace(started_at, now, expected):
    stored = reg(empty(), now=1.0).state
    restarted = ms.Membership.create(
        ipam=stored.ipam,
        started_at=started_at,
        members=list(stored.members.values()),
        revision=stored.revision,
    )
    assert lv.tick(restarted, now=now, policy=POLICY).state.members["n1"].state is expected


def test_expiry_removes_and_quarantines():
    state = reg(empty()).state
    state = reg(state, "n2", 2).state
    state = lv.status(state, node_id="n1", online=False, epoch=1, now=20).state
    assert lv.tick(state, now=119, policy=POLICY).state.members["n1"].state is MemberState.UNREACHABLE
    gone = lv.tick(state, now=120.5, policy=POLICY)
    assert [m.node_id for m in gone.removed] == ["n1"]
    assert "n1" not in gone.state.members and key(1) not in gone.state.keys
    assert "10.1.0.1" in gone.state.ipam.quarantine
    assert gone.state.revision > state.revision
    # n2 was silent too: one tick, one revision for both changes
    assert gone.published[0].node_id == "n2" and gone.published[0].revision == gone.state.revision
    newcomer = reg(gone.state, "n3", 3, now=121).state
    assert newcomer.members["n3"].mesh_ip == "10.1.0.3"
    # the expired node comes back within quarantine: it gets its old address back
    back = reg(newcomer, "n1", 1, now=122).state
    assert back.members["n1"].mesh_ip == "10.1.0.1"


def test_admin_remove_and_unknown():
    state = reg(empty()).state
    assert ms.remove(state, node_ids=["zz"], now=1, reason="x").ignored
    change = ms.remove(state, node_ids=["n1"], now=2, reason="admin")
    assert change.removed and not change.state.members
    assert change.state.revision == 2


@pytest.mark.parametrize("fn", ["hb", "on", "off"])
def test_unknown_node_ignored(fn):
    state = empty()
    if fn == "hb":
        change = lv.heartbeat(state, node_id="x", epoch=1, now=1)
    else:
        change = lv.status(state, node_id="x", online=fn == "on", epoch=1, now=1)
    assert change.state is state and change.ignored


def test_forgive_offline_revives_only_recent_will_downs():
    """A stopping broker publishes every will: offline statuses just before the registrar lost the broker are
    undone on reconnection; older ones, silence (TTL) and members that came back meanwhile are left alone."""
    state = empty()
    for i, node in enumerate(["n1", "n2", "n3", "n4"], start=1):
        state = reg(state, node, i, now=1.0).state
    state = lv.status(state, node_id="n1", online=False, epoch=1, now=5.0).state  # an old, real goodbye
    state = lv.tick(state, now=16.0, policy=POLICY).state  # everyone silent: n2..n4 unreachable by TTL
    state = reg(state, "n2", 2, now=17.0).state
    state = reg(state, "n3", 3, now=17.0).state
    state = reg(state, "n4", 4, now=17.0).state
    will = {"online": False, "epoch": 1, "last_will": True}
    state = lv.status(state, node_id="n2", now=29.5, **will).state  # the broker's shutdown
    state = lv.status(state, node_id="n3", now=29.6, **will).state
    state = lv.heartbeat(state, node_id="n3", epoch=1, now=29.7).state  # ...but n3 spoke again after it
    state = lv.status(state, node_id="n4", online=False, epoch=1, now=29.8).state  # a goodbye: n4 said it
    before = state.revision
    change = lv.forgive_offline(state, since=28.0, now=31.0)
    members = change.state.members
    assert [m.node_id for m in change.published] == ["n2"]
    assert members["n2"].state is MemberState.ACTIVE and members["n2"].last_seen == 31.0
    assert members["n2"].revision == change.state.revision == before + 1
    assert members["n1"].state is MemberState.UNREACHABLE  # before the window: a real goodbye stays
    assert members["n4"].state is MemberState.UNREACHABLE  # a goodbye is never taken back
    assert [h.event for h in change.happened] == [ms.Event.ACTIVE]
    assert not change.state.offline_at
    # Nothing left to forgive: no revision, no publish.
    again = lv.forgive_offline(change.state, since=28.0, now=32.0)
    assert not again.published and again.state.revision == change.state.revision
    # A revived member that is really gone is caught by the TTL again.
    later = lv.tick(replace(change.state, started_at=31.0), now=46.5, policy=POLICY)
    assert "n2" in [m.node_id for m in later.published]


def test_only_a_will_is_doubtful():
    state = reg(empty(), now=1.0).state
    state = reg(state, "n2", 2, now=1.0).state
    will = lv.status(state, node_id="n1", online=False, epoch=1, now=2.0, last_will=True)
    goodbye = lv.status(state, node_id="n2", online=False, epoch=1, now=2.0)
    assert will.doubtful and will.published and "n1" in will.state.offline_at
    assert not goodbye.doubtful and goodbye.published and not goodbye.state.offline_at


def test_forgive_offline_forgets_removed_members():
    state = reg(empty(), now=1.0).state
    state = lv.status(state, node_id="n1", online=False, epoch=1, now=2.0, last_will=True).state
    assert "n1" in state.offline_at
    state = ms.remove(state, node_ids=["n1"], now=3.0, reason="admin").state
    assert not state.offline_at
    assert not lv.forgive_offline(state, since=0.0, now=4.0).published


def test_policy_grace_must_cover_ttl():
    with pytest.raises(ValueError):
        lv.LivenessPolicy(ttl_s=10, expiry_s=100, grace_s=5)


event = st.one_of(
    st.tuples(st.just("reg"), st.sampled_from("abcd"), st.integers(1, 5), st.integers(0, 3)),
    st.tuples(st.just("hb"), st.sampled_from("abcd"), st.integers(0, 3)),
    st.tuples(st.just("status"), st.sampled_from("abcd"), st.booleans(), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("tick")),
    st.tuples(st.just("remove"), st.sampled_from("abcd")),
    st.tuples(st.just("forgive"), st.floats(0, 30)),
    st.tuples(st.just("wait"), st.floats(0, 60)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(event, max_size=50))
def test_invariants_under_any_sequence(events):
    state = empty()
    now = 0.0
    for ev in events:
        before = state
        try:
            if ev[0] == "reg":
                change = reg(state, ev[1], ev[2], epoch=ev[3], now=now)
            elif ev[0] == "hb":
                change = lv.heartbeat(state, node_id=ev[1], epoch=ev[2], now=now)
            elif ev[0] == "status":
                change = lv.status(state, node_id=ev[1], online=ev[2], epoch=ev[3], now=now, last_will=ev[4])
            elif ev[0] == "tick":
                change = lv.tick(state, now=now, policy=POLICY)
            elif ev[0] == "remove":
                change = ms.remove(state, node_ids=[ev[1]], now=now, reason="t")
            elif ev[0] == "forgive":
                change = lv.forgive_offline(state, since=now - ev[1], now=now)
            else:
                now += ev[1]
                continue
        except Refused:
            continue
        state = change.state
        assert state.revision >= before.revision  # the roster revision only grows
        if change.published or change.removed:
            assert state.revision > before.revision
            assert all(m.revision == state.revision for m in change.published)
        ips = [m.mesh_ip for m in state.members.values()]
        assert len(ips) == len(set(ips))  # unique addresses
        assert dict(state.ipam.allocated) == {m.node_id: m.mesh_ip for m in state.members.values()}
        assert dict(state.keys) == {m.public_key: m.node_id for m in state.members.values()}
        assert set(state.offline_at) <= set(state.members)  # no memory of removed members
        for node, m in before.members.items():
            if node in state.members:
                assert state.members[node].mesh_ip == m.mesh_ip  # stable while a member
                assert state.members[node].epoch >= m.epoch
