"""Liveness on both planes: suspect, vouches, control_lost, unreachable (registrar.liveness), table-driven."""

from __future__ import annotations

import pytest
from test_registrar_membership import empty, reg

from meshcontract.messages import MemberState
from registrar import liveness as lv

A, S, C, U = MemberState.ACTIVE, MemberState.SUSPECT, MemberState.CONTROL_LOST, MemberState.UNREACHABLE
TTL, WAIT = 10.0, 3.0
VOUCHING = lv.LivenessPolicy(ttl_s=TTL, expiry_s=100, grace_s=15, vouch_wait_s=WAIT)
PLAIN = lv.LivenessPolicy(ttl_s=TTL, expiry_s=100, grace_s=15)
T0 = 20.0  # after the grace period


def mesh(*nodes: str, now: float = T0):
    state = empty()
    for i, node in enumerate(nodes, start=1):
        state = reg(state, node, i, now=now).state
    return state


def state_of(state, node: str) -> MemberState:
    return state.members[node].state


def will(state, node: str, *, now: float, wait: float = WAIT):
    epoch = state.members[node].epoch
    return lv.status(state, node_id=node, online=False, epoch=epoch, now=now, last_will=True, vouch_wait_s=wait)


def beat(state, node: str, *, now: float, alive=()):
    return lv.heartbeat(state, node_id=node, epoch=state.members[node].epoch, now=now, alive=list(alive))


@pytest.mark.parametrize(
    ("nodes", "wait", "after"),
    [
        (("n1", "n2"), WAIT, S),  # another member may vouch: suspect, peers keep the tunnel and probe
        (("n1",), WAIT, U),  # nobody to vouch: unreachable at once
        (("n1", "n2"), 0.0, U),  # vouching off: the control plane alone decides
    ],
)
def test_a_will_makes_a_member_suspect_only_when_someone_can_vouch(nodes, wait, after):
    change = will(mesh(*nodes), "n1", now=T0 + 1, wait=wait)
    assert state_of(change.state, "n1") is after
    assert change.published and change.state.revision == change.published[0].revision


def test_a_goodbye_is_unreachable_at_once_even_with_vouching():
    state = mesh("n1", "n2")
    change = lv.status(state, node_id="n1", online=False, epoch=1, now=T0 + 1, vouch_wait_s=WAIT)
    assert state_of(change.state, "n1") is U


def test_a_vouch_keeps_a_suspect_in_then_it_must_be_renewed_every_ttl():
    state = will(mesh("n1", "n2", "n3"), "n1", now=T0 + 1).state
    vouched = beat(state, "n2", now=T0 + 2, alive=["n1"])
    state = vouched.state
    assert state_of(state, "n1") is C
    assert [h.event for h in vouched.happened] == [lv.Event.CONTROL_LOST] and vouched.published
    # a renewal changes nothing anyone sees (no new revision), and keeps it in past the first TTL
    renewed = beat(state, "n3", now=T0 + 2 + TTL - 1, alive=["n1"])
    assert not renewed.published and renewed.state.revision == state.revision
    state = renewed.state
    state = beat(state, "n2", now=T0 + 2 + TTL + 5).state  # heartbeats that vouch for nobody
    assert state_of(lv.tick(state, now=T0 + 2 + TTL + 5, policy=VOUCHING).state, "n1") is C
    # no vouch for a TTL: unreachable, peers drop the tunnel
    gone = lv.tick(state, now=T0 + 2 + TTL - 1 + TTL + 0.5, policy=VOUCHING)
    assert state_of(gone.state, "n1") is U
    assert [h.reason for h in gone.happened if h.member.node_id == "n1"] == [
        "no peer reaches it over the mesh either"
    ]


def test_a_suspect_nobody_vouches_for_is_unreachable_after_the_wait():
    state = will(mesh("n1", "n2"), "n1", now=T0 + 1).state
    state = beat(state, "n2", now=T0 + 2).state
    assert state_of(lv.tick(state, now=T0 + 1 + WAIT - 0.1, policy=VOUCHING).state, "n1") is S
    assert state_of(lv.tick(state, now=T0 + 1 + WAIT, policy=VOUCHING).state, "n1") is U


@pytest.mark.parametrize(
    ("voucher_state", "target_state", "counted"),
    [
        (A, S, True),
        (A, C, True),
        (S, S, False),  # only an active member's word counts
        (A, A, False),  # an active member needs no vouch
        (A, U, False),  # an unreachable one comes back only by itself
    ],
)
def test_who_may_vouch_for_whom(voucher_state, target_state, counted):
    state = mesh("n1", "n2", "n3")
    members = dict(state.members)
    from dataclasses import replace

    members["n1"] = replace(members["n1"], state=target_state, lost_since=T0)
    members["n2"] = replace(members["n2"], state=voucher_state, lost_since=T0)
    state = replace(state, members=members)
    change = lv.vouch(state, voucher="n2", alive=["n1"], now=T0 + 1)
    assert (change.ignored is None) is counted
    if counted:
        assert state_of(change.state, "n1") is C and change.state.members["n1"].vouched_at == T0 + 1


def test_a_node_cannot_vouch_for_itself_or_strangers():
    state = will(mesh("n1", "n2"), "n1", now=T0 + 1).state
    assert lv.vouch(state, voucher="n1", alive=["n1"], now=T0 + 2).ignored is not None
    assert lv.vouch(state, voucher="n2", alive=["nobody"], now=T0 + 2).ignored is not None


@pytest.mark.parametrize("lost", [S, C, U])
def test_a_heartbeat_of_the_current_epoch_brings_it_back_from_any_lost_state(lost):
    state = will(mesh("n1", "n2"), "n1", now=T0 + 1).state
    if lost is C:
        state = beat(state, "n2", now=T0 + 2, alive=["n1"]).state
    elif lost is U:
        state = lv.tick(state, now=T0 + 1 + WAIT, policy=VOUCHING).state
    assert state_of(state, "n1") is lost
    back = beat(state, "n1", now=T0 + 5)
    m = back.state.members["n1"]
    assert m.state is A and m.lost_since is None and m.vouched_at is None and back.published


def test_a_silent_member_is_suspect_then_unreachable_without_vouches():
    state = mesh("n1", "n2")
    state = beat(state, "n2", now=T0 + TTL + 0.5).state
    silent = lv.tick(state, now=T0 + TTL + 1, policy=VOUCHING)
    assert state_of(silent.state, "n1") is S and state_of(silent.state, "n2") is A
    assert [h.event for h in silent.happened] == [lv.Event.SUSPECT]
    assert state_of(lv.tick(silent.state, now=T0 + TTL + 1 + WAIT, policy=VOUCHING).state, "n1") is U


def test_a_whole_mesh_gone_silent_at_once_has_nobody_to_vouch():
    state = mesh("n1", "n2")
    change = lv.tick(state, now=T0 + TTL + 1, policy=VOUCHING)
    assert {state_of(change.state, n) for n in ("n1", "n2")} == {U}


def test_without_vouching_nothing_is_ever_suspect():
    state = mesh("n1", "n2")
    change = lv.tick(state, now=T0 + TTL + 1, policy=PLAIN)
    assert {state_of(change.state, n) for n in ("n1", "n2")} == {U}


def test_wills_from_a_broker_shutdown_are_forgiven_also_when_suspect_or_vouched():
    state = mesh("n1", "n2", "n3")
    state = will(state, "n1", now=T0 + 1).state
    state = beat(state, "n3", now=T0 + 1.5, alive=["n1"]).state  # n1 control-lost
    state = will(state, "n2", now=T0 + 1.6).state  # n2 suspect
    forgiven = lv.forgive_offline(state, since=T0 + 0.5, now=T0 + 4)
    assert {state_of(forgiven.state, n) for n in ("n1", "n2")} == {A}


def test_nothing_is_judged_in_the_grace_period_and_in_memory_times_start_over_after_it():
    from dataclasses import replace

    state = mesh("n1", "n2", now=1.0)
    members = dict(state.members)
    # as loaded after a restart: states persisted, in-memory times gone
    members["n1"] = replace(members["n1"], state=C, lost_since=None, vouched_at=None)
    state = replace(state, members=members, started_at=100.0)
    assert state_of(lv.tick(state, now=100.0 + 14.9, policy=VOUCHING).state, "n1") is C
    state = beat(state, "n2", now=100.0 + 14.9).state
    # after the grace: control-lost with no vouch since the restart, a TTL after it
    assert state_of(lv.tick(state, now=100.0 + 15, policy=VOUCHING).state, "n1") is U
