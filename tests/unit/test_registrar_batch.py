"""Deciding a batch (registrar.batch): plain heartbeats applied together, everything else exactly as the engine
decides it one message at a time; table-driven, and on random batches. The fast heartbeat decode accepts
nothing that messages.decode refuses, on the fuzzer's hostile payloads."""

from __future__ import annotations

import json

import pytest
from fuzzing import (
    REGISTRAR_SHAPES,
    deep_json,
    dumps,
    hostile_json,
    json_keys,
    json_values,
    pick,
    raw_payloads,
    render,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_registrar_engine import CONFIG, MESH, enrolled, key, req

from meshcontract import topics
from meshcontract.messages import Heartbeat, decode
from meshcontract.topics import Kind
from registrar import engine
from registrar.batch import Incoming, decide, likely_heartbeat, refresh

NODES = ("n1", "n2")  # the engine tests' token admits two


def hb(node: str, epoch: int = 1, **over) -> tuple[str, bytes]:
    body = {"v": 1, "node_id": node, "epoch": epoch, "seq": 1, "sent_at": 1.0, **over}
    return topics.build(MESH, Kind.HEARTBEAT, node), json.dumps(body).encode()


def status(node: str, state: str, epoch: int = 1, last_will: bool = False) -> tuple[str, bytes]:
    body = {"v": 1, "node_id": node, "state": state, "epoch": epoch, "at": 1.0, "last_will": last_will}
    return topics.build(MESH, Kind.STATUS, node), json.dumps(body).encode()


def register(node: str, epoch: int = 1, port: int = 51820) -> tuple[str, bytes]:
    k = NODES.index(node) + 1 if node in NODES else 9
    body = req(node, k, epoch=epoch, listen_port=port, endpoints=[{"host": "192.0.2.10", "port": port}])
    return topics.build(MESH, Kind.REGISTER, node), json.dumps(body).encode()


def registered() -> engine.CoreState:
    """n1 and n2 enrolled and registered at epoch 1, at t=1."""
    state = enrolled(*NODES)
    for node in NODES:
        state = engine.handle_message(state, *register(node), now=1.0, config=CONFIG).state
    return state


def one_by_one(state: engine.CoreState, batch: list[Incoming]) -> list[engine.Outcome]:
    outcomes = []
    for msg in batch:
        outcomes.append(engine.handle_message(state, msg.topic, msg.payload, now=msg.now, config=CONFIG))
        state = outcomes[-1].state
    return outcomes


def decide_in_rounds(state: engine.CoreState, batch: list[Incoming], cuts: list[int]):
    """decide() over `batch` cut into rounds at `cuts`, the refreshes left pending carried from round to round, as
    the writer does. Returns (state, pending, outcomes, refreshed)."""
    pending, outcomes, refreshed, start = {}, [], 0, 0
    for end in [*sorted(c for c in cuts if 0 < c < len(batch)), len(batch)]:
        decided = decide(state, batch[start:end], config=CONFIG, pending=pending)
        state, pending, start = decided.state, decided.pending, end
        outcomes += decided.outcomes
        refreshed += decided.refreshed
    return state, pending, outcomes, refreshed


def assert_same_as_one_by_one(state: engine.CoreState, batch: list[Incoming], cuts=()):
    """decide() ends in the engine's state once its pending refreshes are applied, gives the engine's Outcome for
    every message it did not set aside, and sets aside only messages whose Outcome says nothing (no write, no
    publication, no reply, no log)."""
    expected = one_by_one(state, batch)
    final, pending, outcomes, refreshed = decide_in_rounds(state, batch, list(cuts))
    assert refresh(final, pending) == (expected[-1].state if expected else state)
    assert len(outcomes) + refreshed == len(batch)
    decided = decide(state, batch, config=CONFIG)
    assert decided.outcomes == outcomes and decided.refreshed == refreshed  # rounds or not
    got = iter(outcomes)
    wanted = next(got, None)
    for outcome in expected:
        if wanted is not None and outcome == wanted:
            wanted = next(got, None)
            continue
        assert outcome.delta.is_empty() and not outcome.published and not outcome.removed
        assert outcome.reply is None and outcome.rejected is None and outcome.ignored is None
        assert not outcome.change.happened and not outcome.change.dirty
    assert wanted is None  # every outcome of decide() was matched, in order
    return decided


CASES = [
    ("plain heartbeats are folded", [hb("n1"), hb("n2"), hb("n1", epoch=2)], 3),
    ("a vouch is the engine's", [hb("n1", alive=["n2"])], 0),
    ("a path report is the engine's", [hb("n1", paths={"fresh": 2, "broken": []})], 0),
    ("a stale epoch is ignored by the engine", [hb("n1", epoch=0)], 0),
    ("an unknown node is the engine's", [hb("n9")], 0),
    ("a payload naming another node is refused by the engine", [(hb("n1")[0], hb("n2")[1])], 0),
    ("junk is refused by the engine", [(hb("n1")[0], b"{not json")], 0),
    ("another mesh's heartbeat is the engine's", [("meshvpn/v1/other/heartbeat/n1", hb("n1")[1])], 0),
    ("a member that is not active comes back through the engine", [status("n1", "offline"), hb("n1")], 0),
    ("heartbeats around other messages", [hb("n1"), register("n2", port=51821), hb("n2"), hb("n1")], 3),
]  # fmt: skip


@pytest.mark.parametrize(("why", "messages", "folded"), CASES, ids=[c[0] for c in CASES])
def test_only_plain_heartbeats_are_folded(why, messages, folded):
    batch = [Incoming(t, p, 10.0 + i) for i, (t, p) in enumerate(messages)]
    decided = assert_same_as_one_by_one(registered(), batch)
    assert decided.refreshed == folded


def test_a_folded_heartbeat_moves_last_seen_and_nothing_else():
    state = registered()
    decided = decide(state, [Incoming(*hb("n1"), 10.0), Incoming(*hb("n1"), 11.0)], config=CONFIG)
    assert decided.state is state and set(decided.pending) == {"n1"}  # nothing applied yet
    before, after = state.membership, refresh(decided.state, decided.pending).membership
    assert after.members["n1"].last_seen == 11.0 and after.revision == before.revision
    assert {n: m for n, m in after.members.items() if n != "n1"} == {n: m for n, m in before.members.items() if n != "n1"}
    assert decided.outcomes == []


message = st.one_of(
    st.builds(lambda n, e: hb(n, e), st.sampled_from((*NODES, "n9")), st.integers(0, 3)),
    st.builds(lambda n, v: hb(n, alive=[v]), st.sampled_from(NODES), st.sampled_from(NODES)),
    st.builds(lambda n: hb(n, paths={"fresh": 1, "broken": []}), st.sampled_from(NODES)),
    st.builds(lambda n, s, e, w: status(n, s, e, w), st.sampled_from(NODES), st.sampled_from(["online", "offline"]),
              st.integers(0, 3), st.booleans()),
    st.builds(lambda n, e, p: register(n, e, p), st.sampled_from(NODES), st.integers(0, 3), st.sampled_from([51820, 51821])),
    st.builds(lambda n, p: (hb(n)[0], p), st.sampled_from(NODES), st.sampled_from([b"", b"[]", b"{}", b'{"v": 2}'])),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(message, st.floats(0, 2)), max_size=40), st.lists(st.integers(0, 40), max_size=4))
def test_a_random_batch_is_decided_as_the_engine_decides_it_one_message_at_a_time(messages, cuts):
    now, batch = 10.0, []
    for (topic, payload), step in messages:
        now += step
        batch.append(Incoming(topic, payload, now))
    assert_same_as_one_by_one(registered(), batch, cuts)


def test_refreshes_pending_from_an_earlier_batch_are_applied_before_the_engine_decides():
    state = registered()
    first = decide(state, [Incoming(*hb("n1"), 10.0)], config=CONFIG)
    second = decide(first.state, [Incoming(*status("n2", "offline"), 11.0)], config=CONFIG, pending=first.pending)
    assert second.pending == {} and second.state.membership.members["n1"].last_seen == 10.0
    assert first.pending and state.membership.members["n1"].last_seen == 1.0  # inputs untouched


def test_registered_fixture_is_active_at_epoch_1():
    members = registered().membership.members
    assert {m.epoch for m in members.values()} == {1} and key(1) == members["n1"].public_key


def _with_a_key_before(payload: bytes, name: str, value: object) -> bytes:
    """`payload` (a JSON object) with one more member in front: a duplicate key when `name` is one of its own."""
    if not payload.startswith(b"{") or payload == b"{}":
        return payload
    raw = value if isinstance(value, bytes) else dumps(value)
    return b"{" + dumps(name) + b":" + raw + b"," + payload[1:]


heartbeat_shaped = st.builds(
    lambda shape, node: render(shape, node_id=node), REGISTRAR_SHAPES[Kind.HEARTBEAT], st.sampled_from([*NODES, "n9"])
)
heartbeat_payloads = pick(
    (4, heartbeat_shaped),
    (2, st.builds(_with_a_key_before, heartbeat_shaped, json_keys, pick(json_values, deep_json))),
    raw_payloads,
    hostile_json,
)


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(heartbeat_payloads)
def test_the_fast_heartbeat_decode_accepts_only_what_decode_accepts_and_reads_it_alike(payload):
    fast = likely_heartbeat(payload)
    if fast is not None:
        assert decode(Heartbeat, payload) == fast


@pytest.mark.parametrize(
    ("why", "payload", "fast"),
    [
        ("the common heartbeat", hb("n1")[1], True),
        ("without a version", b'{"node_id":"n1","epoch":1,"seq":1,"sent_at":1.0}', True),
        ("with an empty vouch", hb("n1", alive=[])[1], True),
        ("a duplicate key nesting deeper than allowed", b'{"paths":' + b"[" * 9 + b"]" * 9 + hb("n1")[1][1:], False),
        ("over the size limit", hb("n1")[1] + b" " * 20_000, False),
        ("another version", hb("n1", v=2)[1], False),
        ("an unknown field", hb("n1", extra=1)[1], False),
        ("a byte order mark", b"\xef\xbb\xbf" + hb("n1")[1], False),
        ("trailing data", hb("n1")[1] + b" x", False),
    ],
)
def test_the_fast_heartbeat_decode_takes_the_common_shape_and_leaves_the_rest_to_decode(why, payload, fast):
    assert (likely_heartbeat(payload) is not None) is fast
