"""The registrar's message handler: registration replies, every refusal, and fuzzed input that changes nothing."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcontract import access, topics
from meshcontract.messages import EnrollRequest, ErrorCode, MemberState, MeshSettings, decode
from registrar import engine, tokens
from registrar.ipam import Ipam
from registrar.liveness import LivenessPolicy
from registrar.membership import Membership

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
TOKEN = "mvj_test-token-0123456789"
PASSWORD = "node-password-0123456789"


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def fresh() -> engine.CoreState:
    table, _ = tokens.create(tokens.EMPTY, secret=TOKEN, now=0, reusable=True, max_uses=2)
    return engine.CoreState(
        Membership.create(ipam=Ipam.create("10.2.0.0/24", quarantine_s=60), started_at=0), table
    )


def req(node="n1", k=1, **over) -> dict:
    """A RegisterRequest body (MQTT register/<node>; the broker has authenticated the sender as <node>)."""
    body = {
        "v": 1,
        "request_id": "req-00001",
        "node_id": node,
        "name": f"Node {node}",
        "public_key": key(k),
        "endpoints": [{"host": "192.0.2.10", "port": 51820}],
        "listen_port": 51820,
        "epoch": 1,
    }
    body.update(over)
    return body


def enrollment(node="n1", k=1, **over) -> EnrollRequest:
    body = {
        "node_id": node, "name": f"Node {node}", "public_key": key(k),
        "endpoints": [{"host": "192.0.2.10", "port": 51820}], "listen_port": 51820,
        "token": TOKEN, "password": PASSWORD,
    }  # fmt: skip
    body.update(over)
    return EnrollRequest.model_validate(body)


def enroll(state, node="n1", k=1, now=1.0, **over) -> engine.Outcome:
    request = enrollment(node, k, **over)
    return engine.enroll(state, request, now=now, config=CONFIG, password_hash=access.hash_password(request.password))


def enrolled(*nodes: str) -> engine.CoreState:
    state = fresh()
    for i, node in enumerate(nodes, start=1):
        state = enroll(state, node, i).state
    return state


def send(state, kind, node, body, now=1.0):
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return engine.handle_message(state, topics.build(MESH, kind, node), payload, now=now, config=CONFIG)


def test_enroll_admits_with_a_token_and_asks_for_an_account():
    out = enroll(fresh())
    reply = out.enroll_reply
    assert reply.ok and reply.mesh_ip == "10.2.0.1" and reply.prefix_len == 24 and reply.settings == CONFIG.mesh
    assert out.delta.upsert_members and out.delta.upsert_tokens[0].uses == 1 and out.delta.revision == 1
    assert out.accounts_add == (("n1", PASSWORD),) and PASSWORD not in repr(out), "never in logs"
    member = out.state.membership.members["n1"]
    assert access.verify_password(PASSWORD, member.password_hash) and PASSWORD not in repr(member)


def test_a_retried_enrollment_is_answered_again_without_the_token():
    """The reply was lost; the node retries with the same key and password: same IP, no second token use, even
    though its single-use token is spent by now."""
    table, _ = tokens.create(tokens.EMPTY, secret=TOKEN, now=0)  # single-use
    state = enroll(engine.with_tokens(fresh(), table)).state
    again = enroll(state)
    assert again.enroll_reply.ok and again.enroll_reply.mesh_ip == "10.2.0.1"
    assert not again.delta.upsert_tokens and again.accounts_add == (("n1", PASSWORD),)


@pytest.mark.parametrize(
    ("over", "code"),
    [
        pytest.param(dict(k=9), ErrorCode.UNAUTHORIZED, id="same node id, another key"),
        pytest.param(dict(password="another-password-0123"), ErrorCode.UNAUTHORIZED, id="same node id, wrong password"),
        pytest.param(dict(node="n2"), ErrorCode.KEY_CONFLICT, id="another node id, n1's key"),
        pytest.param(dict(node="n2", k=2, token="mvj_wrong-token-0123456789"), ErrorCode.INVALID_TOKEN, id="bad token"),
        pytest.param(dict(node="n2", k=2, token="garbage"), ErrorCode.INVALID_TOKEN, id="malformed token"),
    ],
)
def test_a_token_never_takes_over_an_identity(over, code):
    state = enrolled("n1")
    out = enroll(state, **{"node": "n1", "k": 1, **over})
    assert not out.enroll_reply.ok and out.enroll_reply.error.code is code
    assert out.state is state and out.delta.is_empty() and not out.accounts_add


def test_token_limits():
    state = enrolled("n1", "n2")  # a reusable token with 2 uses
    assert enroll(state, "n3", 3).enroll_reply.error.code is ErrorCode.TOKEN_USED
    table, _ = tokens.create(tokens.EMPTY, secret=TOKEN, now=0, ttl_s=1)
    expired = enroll(engine.with_tokens(fresh(), table), now=2)
    assert expired.enroll_reply.error.code is ErrorCode.TOKEN_EXPIRED


def test_the_pin_is_not_part_of_the_secret():
    out = enroll(fresh(), token=TOKEN + "." + "A" * 43)
    assert out.enroll_reply.ok, "a token pasted whole (with its CA pin) works"


def test_register_needs_enrollment():
    out = send(fresh(), topics.Kind.REGISTER, "n1", req())
    assert out.reply.error.code is ErrorCode.NOT_ENROLLED and out.delta.is_empty()


def test_register_refreshes_a_member():
    state = enrolled("n1")
    out = send(state, topics.Kind.REGISTER, "n1", req(epoch=5))
    assert out.reply.ok and out.reply.mesh_ip == "10.2.0.1" and out.reply_to == "n1"
    assert out.state.membership.members["n1"].epoch == 5
    stale = send(out.state, topics.Kind.REGISTER, "n1", req(epoch=4))
    assert stale.reply.error.code is ErrorCode.INVALID_REQUEST


def https(state, node, body, now=1.0):
    """A registration over HTTPS, from the node the API authenticated with its own credential."""
    return engine.register_payload(state, json.dumps(body).encode(), now=now, config=CONFIG, node_id=node)


def test_register_over_https_with_a_new_key_rotates_it():
    state = enrolled("n1", "n2")
    out = https(state, "n1", req(k=7, epoch=2))
    member = out.state.membership.members["n1"]
    assert out.reply.ok and member.public_key == key(7) and member.mesh_ip == "10.2.0.1"
    assert out.state.membership.keys[key(7)] == "n1" and key(1) not in out.state.membership.keys
    assert [h.event.name for h in out.change.happened] == ["KEY_ROTATED"] and out.delta.revision
    taken = https(state, "n1", req(k=2, epoch=2))
    assert taken.reply.error.code is ErrorCode.KEY_CONFLICT, "not onto another member's key"


def test_a_new_key_through_the_broker_is_refused():
    """A broker admin can publish as any node; it must not be able to give a node a key it does not hold."""
    state = enrolled("n1", "n2")
    out = send(state, topics.Kind.REGISTER, "n1", req(k=7, epoch=2**40))
    assert out.reply.error.code is ErrorCode.REKEY_OVER_HTTPS
    assert out.state.membership is state.membership, "nothing changed: not the key, not the epoch"
    same_key = send(state, topics.Kind.REGISTER, "n1", req(k=1, epoch=2))
    assert same_key.reply.ok, "a registration that keeps the key is fine over MQTT"


def test_removal_revokes_the_key_until_approved():
    state = enrolled("n1")
    gone = engine.remove_member(state, "n1", now=3)
    assert gone.delta.delete_members == ("n1",) and gone.accounts_remove == ("n1",)
    assert gone.delta.upsert_revoked[0].public_key == key(1)
    again = enroll(gone.state, now=4)
    assert again.enroll_reply.error.code is ErrorCode.KEY_REVOKED, "a reusable token does not bring it back"
    rotated_onto = https(enrolled("n2"), "n2", req("n2", k=1, epoch=2))
    assert rotated_onto.reply.ok  # (another state: key 1 is not revoked there)
    approved = engine.approve_key(gone.state, key(1))
    assert approved.delta.delete_revoked == (key(1),)
    assert enroll(approved.state, now=5).enroll_reply.ok
    assert engine.approve_key(approved.state, key(1)).ignored


def test_rotation_onto_a_revoked_key_is_refused():
    state = engine.remove_member(enrolled("n1", "n2"), "n1", now=3).state
    out = https(state, "n2", req("n2", k=1, epoch=2))
    assert out.reply.error.code is ErrorCode.KEY_REVOKED


def test_removal_without_revoking_lets_a_token_bring_it_back():
    gone = engine.remove_member(enrolled("n1"), "n1", now=3, revoke_key=False)
    assert gone.accounts_remove == ("n1",) and not gone.delta.upsert_revoked
    assert enroll(gone.state, now=4).enroll_reply.ok


def test_expiry_removes_the_account_not_the_key():
    state = enrolled("n1")
    down = engine.tick(state, now=10, config=CONFIG).state  # silent past the TTL: unreachable
    gone = engine.tick(down, now=100, config=CONFIG)  # unreachable past expiry: removed
    assert gone.removed and gone.accounts_remove == ("n1",) and not gone.delta.upsert_revoked


def test_authenticate():
    state = enrolled("n1")
    assert engine.authenticate(state, "n1", PASSWORD)
    assert not engine.authenticate(state, "n1", PASSWORD + "x")
    assert not engine.authenticate(state, "n2", PASSWORD)


def test_status_and_heartbeat_flow():
    state = send(enrolled("n1"), topics.Kind.REGISTER, "n1", req(epoch=5)).state
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
        ("meshvpn/v1/lab/register/n1", b"[" * 100000 + b"]" * 100000),  # once a RecursionError in the writer
        ("meshvpn/v1/lab/heartbeat/n1", b'{"v":' * 3000 + b"1" + b"}" * 3000),
        ("meshvpn/v1/lab/members/n1", b"{}"),
        ("elsewhere/topic", b""),
        # a reserved name is a valid topic level: the error reply to it once raised, dropping the writer's batch
        ("meshvpn/v1/lab/register/observer", json.dumps(req("observer")).encode()),
        ("meshvpn/v1/lab/register/registrar", b'{"request_id": "abcdefgh1"}'),
        ("meshvpn/v1/lab/heartbeat/admin", b'{"v":1,"node_id":"admin","epoch":1,"seq":1,"sent_at":1}'),
        ("meshvpn/v1/lab/register/n1\n", b'{"request_id": "abcdefgh1"}'),  # once a node id: its reply raised
        # An integer past Python's digit limit: json.loads' ValueError once escaped and dropped the writer's batch.
        ("meshvpn/v1/lab/heartbeat/n1", b'{"v":1,"node_id":"n1","epoch":1,"seq":' + b"9" * 5000 + b',"sent_at":1}'),
        ("meshvpn/v1/lab/register/n1", b'{"request_id": "abcdefgh1", "epoch": ' + b"9" * 5000 + b"}"),
        ("meshvpn/v1/lab/status/n1", b'{"v":1,"node_id":"n1","state":"offline","epoch":' + b"9" * 5000 + b',"at":1}'),
    ],
)
def test_bad_input_changes_nothing(topic, payload):
    state = enrolled("n1")
    out = engine.handle_message(state, topic, payload, now=2, config=CONFIG)
    assert out.state is state and out.delta.is_empty()
    assert out.rejected or out.ignored
    if out.reply is not None:
        assert not out.reply.ok


def test_bad_register_with_request_id_gets_error_reply():
    out = send(fresh(), topics.Kind.REGISTER, "n1", {"request_id": "abcdefgh1", "junk": True})
    assert out.reply.request_id == "abcdefgh1" and out.reply.error.code is ErrorCode.INVALID_REQUEST


def test_tokens():
    out = engine.create_token(fresh(), secret="another", now=5, reusable=False)
    assert out.delta.upsert_tokens == (out.token,)
    out2 = engine.revoke_token(out.state, out.token.id)
    assert out2.delta.delete_tokens == (out.token.id,)
    assert engine.revoke_token(out2.state, out.token.id).ignored


def test_tick_outcome_persists_quarantine_expiry():
    state = engine.remove_member(enrolled("n1"), "n1", now=3).state
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
        [topics.build(MESH, k, "n1") for k in topics.PER_NODE] + [topics.build(MESH, topics.Kind.SNAPSHOT)]
    ),
    st.text(max_size=40),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic_strings, payloads)
def test_fuzz_never_raises_and_refusals_change_nothing(topic, payload):
    state = enrolled("n1")
    out = engine.handle_message(state, topic, payload, now=2, config=CONFIG)
    if out.rejected:
        assert out.state is state and out.delta.is_empty()
    if out.reply is not None:
        # every reply we would send must itself be valid on the wire
        decode(type(out.reply), out.reply.model_dump_json().encode())
        assert out.reply_to is not None
