"""The registrar's message handler: registration replies, every refusal, and fuzzed input that changes nothing."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcontract import topics
from meshcontract.messages import ErrorCode, MemberState, MeshSettings, decode
from registrar import engine, tokens
from registrar.ipam import Ipam
from registrar.membership import LivenessPolicy, Membership

MESH = "lab"
CONFIG = engine.Config(
    mesh=MeshSettings(
        mesh=MESH,
        network="10.2.0.0/24",
        heartbeat_interval_s=1,
        heartbeat_ttl_s=3,
        persistent_keepalive_s=25,
        mtu=1420,
    ),
    policy=LivenessPolicy(ttl_s=3, expiry_s=30, grace_s=4),
)
TOKEN = "mvj_test-token"


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def fresh() -> engine.CoreState:
    table, _ = tokens.create(tokens.EMPTY, secret=TOKEN, now=0, reusable=True, max_uses=2)
    return engine.CoreState(
        Membership.create(ipam=Ipam.create("10.2.0.0/24", quarantine_s=60), started_at=0), table
    )


def req(node="n1", k=1, **over) -> dict:
    body = {
        "v": 1,
        "request_id": "req-00001",
        "node_id": node,
        "name": f"Node {node}",
        "public_key": key(k),
        "endpoints": [{"host": "192.0.2.10", "port": 51820}],
        "listen_port": 51820,
        "join_token": TOKEN,
        "epoch": 1,
    }
    body.update(over)
    return body


def send(state, kind, node, body, now=1.0):
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return engine.handle_message(state, topics.build(MESH, kind, node), payload, now=now, config=CONFIG)


def test_register_ok():
    out = send(fresh(), topics.Kind.REGISTER, "n1", req())
    assert out.reply.ok and out.reply.mesh_ip == "10.2.0.1" and out.reply.prefix_len == 24
    assert out.reply.settings == CONFIG.mesh and out.reply_to == "n1"
    assert out.delta.upsert_members and out.delta.upsert_tokens[0].uses == 1 and out.delta.revision == 1


def test_reregistration_needs_no_token():
    state = send(fresh(), topics.Kind.REGISTER, "n1", req()).state
    out = send(state, topics.Kind.REGISTER, "n1", req(join_token=None, epoch=2))
    assert out.reply.ok and out.reply.mesh_ip == "10.2.0.1"
    assert len(out.state.membership.members) == 1 and not out.delta.upsert_tokens


def test_own_broker_password_travels_with_the_outcome_not_the_reply():
    out = send(fresh(), topics.Kind.REGISTER, "n1", req(broker_password="p" * 24))
    assert out.change.joined and out.broker_password == "p" * 24
    assert out.reply.broker_password is None and "p" * 24 not in repr(out)  # never echoed or logged
    refused = send(fresh(), topics.Kind.REGISTER, "n1", req(join_token="nope", broker_password="p" * 24))
    assert not refused.reply.ok and refused.broker_password is None


@pytest.mark.parametrize(
    ("topic_node", "body", "code"),
    [
        ("n1", req(join_token=None), ErrorCode.INVALID_TOKEN),
        ("n1", req(join_token="nope"), ErrorCode.INVALID_TOKEN),
        ("n1", req(public_key="AAAA"), ErrorCode.INVALID_KEY),
        ("n1", req(listen_port=0), ErrorCode.INVALID_REQUEST),
        ("n1", req(extra=1), ErrorCode.INVALID_REQUEST),
        ("n1", req(node="n2"), ErrorCode.INVALID_REQUEST),  # payload node id differs from topic
        ("n9", req(node="n9", k=9, epoch=1), None),
    ],
)
def test_register_errors(topic_node, body, code):
    out = send(fresh(), topics.Kind.REGISTER, topic_node, body)
    if code is None:
        assert out.reply.ok
        return
    assert not out.reply.ok and out.reply.error.code is code and out.reply_to == topic_node
    assert out.state.membership is fresh().membership or not out.state.membership.members
    assert out.delta.is_empty() and out.rejected


def test_token_exhaustion_and_conflicts():
    state = send(fresh(), topics.Kind.REGISTER, "n1", req()).state
    state = send(state, topics.Kind.REGISTER, "n2", req("n2", 2)).state
    out = send(state, topics.Kind.REGISTER, "n3", req("n3", 3))
    assert out.reply.error.code is ErrorCode.TOKEN_USED
    out = send(state, topics.Kind.REGISTER, "n1", req("n1", 5))
    assert out.reply.error.code is ErrorCode.KEY_CONFLICT
    out = send(state, topics.Kind.REGISTER, "n4", req("n4", 1))
    assert out.reply.error.code is ErrorCode.KEY_CONFLICT


def test_expired_token():
    table, _ = tokens.create(tokens.EMPTY, secret="short", now=0, ttl_s=1)
    state = engine.with_tokens(fresh(), table)
    out = send(state, topics.Kind.REGISTER, "n1", req(join_token="short"), now=2)
    assert out.reply.error.code is ErrorCode.TOKEN_EXPIRED


def test_status_and_heartbeat_flow():
    state = send(fresh(), topics.Kind.REGISTER, "n1", req(epoch=5)).state
    will = {"v": 1, "node_id": "n1", "state": "offline", "epoch": 4, "at": 1.0}
    out = send(state, topics.Kind.STATUS, "n1", will)
    assert out.ignored and out.delta.is_empty()
    out = send(state, topics.Kind.STATUS, "n1", {**will, "epoch": 5})
    assert out.published[0].state is MemberState.UNREACHABLE
    state = out.state
    hb = {"v": 1, "node_id": "n1", "epoch": 5, "seq": 1, "sent_at": 2.0}
    out = send(state, topics.Kind.HEARTBEAT, "n1", hb, now=2.0)
    assert out.published[0].state is MemberState.ACTIVE and out.delta.revision == 3
    assert send(out.state, topics.Kind.HEARTBEAT, "n1", hb, now=2.5).delta.is_empty()


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("meshvpn/v1/lab/register", b"{}"),
        ("meshvpn/v1/other/register/n1", json.dumps(req()).encode()),
        ("meshvpn/v1/lab/heartbeat/n1", b"not json"),
        ("meshvpn/v1/lab/heartbeat/n1", b"[]"),
        ("meshvpn/v1/lab/status/n1", b'{"v":1,"node_id":"n2","state":"offline","epoch":9,"at":1}'),
        ("meshvpn/v1/lab/register/n1", b"x" * 20000),
        ("meshvpn/v1/lab/register/n1", b'{"request_id": "r"}'),
        ("meshvpn/v1/lab/members/n1", b"{}"),
        ("elsewhere/topic", b""),
    ],
)
def test_bad_input_changes_nothing(topic, payload):
    state = send(fresh(), topics.Kind.REGISTER, "n1", req()).state
    out = engine.handle_message(state, topic, payload, now=2, config=CONFIG)
    assert out.state is state and out.delta.is_empty()
    assert out.rejected or out.ignored
    if out.reply is not None:
        assert not out.reply.ok


def test_bad_register_with_request_id_gets_error_reply():
    out = send(fresh(), topics.Kind.REGISTER, "n1", {"request_id": "abcdefgh1", "junk": True})
    assert out.reply.request_id == "abcdefgh1" and out.reply.error.code is ErrorCode.INVALID_REQUEST


def test_tokens_and_admin_removal():
    out = engine.create_token(fresh(), secret="another", now=5, reusable=False)
    assert out.delta.upsert_tokens == (out.token,)
    out2 = engine.revoke_token(out.state, out.token.id)
    assert out2.delta.delete_tokens == (out.token.id,)
    assert engine.revoke_token(out2.state, out.token.id).ignored
    state = send(fresh(), topics.Kind.REGISTER, "n1", req()).state
    gone = engine.remove_member(state, "n1", now=3)
    assert gone.delta.delete_members == ("n1",) and gone.delta.quarantine and gone.removed


def test_tick_outcome_persists_quarantine_expiry():
    state = send(fresh(), topics.Kind.REGISTER, "n1", req()).state
    state = engine.remove_member(state, "n1", now=3).state
    out = engine.tick(state, now=100, config=CONFIG)
    assert out.delta.quarantine == ()


payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.sampled_from(list(req()) + ["x"]),
            st.one_of(
                st.none(),
                st.integers(),
                st.text(max_size=20),
                st.booleans(),
                st.lists(st.integers(), max_size=3),
            ),
        ),
    ),
    st.builds(
        lambda d: json.dumps({**req(), **d}).encode(),
        st.dictionaries(
            st.sampled_from(list(req())),
            st.one_of(st.none(), st.integers(-5, 70000), st.text(max_size=70), st.floats(allow_nan=False)),
            max_size=3,
        ),
    ),
)
topic_strings = st.one_of(
    st.sampled_from(
        [topics.build(MESH, k, "n1") for k in topics.PER_NODE] + [topics.build(MESH, topics.Kind.ROSTER)]
    ),
    st.text(max_size=40),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic_strings, payloads)
def test_fuzz_never_raises_and_refusals_change_nothing(topic, payload):
    state = send(fresh(), topics.Kind.REGISTER, "n1", req()).state
    out = engine.handle_message(state, topic, payload, now=2, config=CONFIG)
    if out.rejected:
        assert out.state is state and out.delta.is_empty()
    if out.reply is not None:
        # every reply we would send must itself be valid on the wire
        decode(type(out.reply), out.reply.model_dump_json().encode())
        assert out.reply_to is not None
