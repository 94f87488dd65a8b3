"""The shared contract: topics build/parse round trips, payload validation, canonical form, settings loading."""

from __future__ import annotations

import base64
import json

import pytest
from pydantic import BaseModel

from meshcontract import messages as m
from meshcontract import topics
from meshcontract.errors import ContractError, PayloadError, TopicError
from meshcontract.settings import load_settings
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings

KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize(
    ("kind", "node", "expected"),
    [
        (Kind.REGISTER, "n1", "meshvpn/v1/home/register/n1"),
        (Kind.REPLY, "n1", "meshvpn/v1/home/reply/n1"),
        (Kind.STATUS, "node-2", "meshvpn/v1/home/status/node-2"),
        (Kind.HEARTBEAT, "a_b", "meshvpn/v1/home/heartbeat/a_b"),
        (Kind.MEMBERS, "n1", "meshvpn/v1/home/members/n1"),
        (Kind.SNAPSHOT, None, "meshvpn/v1/home/snapshot"),
        (Kind.DELTA, None, "meshvpn/v1/home/delta"),
        (Kind.REGISTRAR, None, "meshvpn/v1/home/registrar"),
    ],
)
def test_build_and_parse_round_trip(kind, node, expected):
    assert topics.build("home", kind, node) == expected
    parsed = topics.parse(expected)
    assert (parsed.mesh, parsed.kind, parsed.node) == ("home", kind, node)
    assert str(parsed) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "meshvpn/v2/home/roster",
        "other/v1/home/roster",
        "meshvpn/v1/home/nope/n1",
        "meshvpn/v1/home/status",
        "meshvpn/v1/home/status/n1/extra",
        "meshvpn/v1/home/status/+",
        "meshvpn/v1/home/status/#",
        "meshvpn/v1/home/status/N1",
        "meshvpn/v1/Home/roster",
        "meshvpn/v1/home/roster/x",
        "meshvpn/v1/home/status/" + "a" * 64,
        "meshvpn/v1/home/status/n\x00",
        "meshvpn/v1/home/status/n1\n",  # `$` matches before a final new line: once a valid node id
        "meshvpn/v1/home\n/status/n1",
    ],
)
def test_parse_rejects_topics_outside_the_contract(topic):
    with pytest.raises(TopicError):
        topics.parse(topic)


@pytest.mark.parametrize(
    ("mesh", "kind", "node"),
    [("home", Kind.STATUS, None), ("home", Kind.SNAPSHOT, "n1"), ("ho/me", Kind.SNAPSHOT, None), ("home", Kind.STATUS, "+"),
     ("home", Kind.STATUS, "n1\n"), ("home\n", Kind.SNAPSHOT, None)],  # fmt: skip
)
def test_build_rejects_bad_arguments(mesh, kind, node):
    with pytest.raises(TopicError):
        topics.build(mesh, kind, node)


def test_subscription_filters():
    assert topics.subscription("home", Kind.MEMBERS) == "meshvpn/v1/home/members/+"
    assert topics.subscription("home", Kind.SNAPSHOT) == "meshvpn/v1/home/snapshot"
    assert topics.mesh_filter("home") == "meshvpn/v1/home/#"


def _request(**overrides) -> dict:
    base = {
        "v": 1,
        "request_id": "req-000001",
        "node_id": "n1",
        "name": "alpha",
        "public_key": KEY,
        "endpoints": [{"host": "10.0.0.1", "port": 51820}],
        "listen_port": 51820,
        "epoch": 7,
    }
    base.update(overrides)
    return base


def test_register_request_round_trip_and_canonical_form():
    req = m.RegisterRequest.model_validate(_request())
    assert m.decode(m.RegisterRequest, m.encode(req)) == req
    canonical = m.canonical_json(req)
    assert canonical.startswith(b'{"endpoints":') and b" " not in canonical
    assert m.canonical_json(m.decode(m.RegisterRequest, m.encode(req))) == canonical


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1,2]", "expected a JSON object"),
        (b"\xff\xfe", "not JSON"),
        (b'{"v": 2}', "unsupported schema version 2, this side speaks 1"),
        (b'{"v": "${jndi:ldap://x/a}\\u202e"}', r"unsupported schema version \(not a version number\)"),  # never echoed
        (m.encode(m.RegisterRequest.model_validate(_request())).replace(b'"epoch":7', b'"epoch":"7"'), "epoch"),
        (m.encode(m.RegisterRequest.model_validate(_request())).replace(b'"n1"', b'"N1"'), "node_id"),
        (b" " * (m.MAX_PAYLOAD + 1), "exceeds"),
        (b"[" * 5000 + b"]" * 5000, "nested"),  # a RecursionError in the parser, before it could be one
        (b'{"a":' * 20 + b"1" + b"}" * 20, "nested"),
        (b'{"epoch": ' + b"9" * 5000 + b"}", "not JSON"),  # json.loads' ValueError for a 5,000-digit integer
    ],
)
def test_decode_rejects_with_a_reason(payload, reason):
    with pytest.raises(PayloadError, match=reason):
        m.decode(m.RegisterRequest, payload)


@pytest.mark.parametrize("name", ["\u202eevil", "a\nINFO forged log line", "x" * 8000, "n\x00", "<b>"])
def test_a_reason_never_repeats_a_made_up_field_name(name):
    """Found by fuzzing: an unknown key came back verbatim in the reason (to the sender over HTTP, into logs)."""
    body = {**_request(), name: 1}
    with pytest.raises(PayloadError) as caught:
        m.decode(m.RegisterRequest, json.dumps(body).encode())
    assert name not in str(caught.value) and "(unknown field): Extra inputs" in str(caught.value)
    assert m.error_location(["endpoints", 0, "host", "extra_1"]) == ["endpoints", 0, "host", "extra_1"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"public_key": "short"},
        {"public_key": base64.b64encode(b"x" * 31).decode()},
        {"name": "bad\nname"},
        {"name": ""},
        {"listen_port": 0},
        {"extra": 1},
        {"epoch": -1},
        {"endpoints": [{"host": "a b", "port": 1}]},
        {"endpoints": [{"host": "h", "port": 1}] * 9},
        {"request_id": "x"},
        {"join_token": "no secrets here any more"},
        {"broker_password": "p" * 32},
        {"node_id": "observer"},
        {"node_id": "registrar"},
        {"name": "evil\u202egpj.exe"},
        {"name": "zero\u200bwidth"},
        {"name": " padded"},
    ],
)
def test_register_request_field_rules(overrides):
    with pytest.raises(ValueError):
        m.RegisterRequest.model_validate(_request(**overrides))


@pytest.mark.parametrize("name", ["laptop", "Müller's PC", "東京-1", "a b"])
def test_names_people_use_are_fine(name):
    assert m.RegisterRequest.model_validate(_request(name=name)).name == name


def test_no_message_on_a_readable_topic_has_a_field_for_secrets():
    """Nothing published over MQTT can carry a token or password: the models have no such fields (issue 11)."""
    secretive = {"token", "join_token", "password", "broker_password", "private_key"}
    for model in (m.RegisterRequest, m.RegisterReply, m.NodeStatus, m.Heartbeat, m.MemberRecord,
                  m.MembershipSnapshot, m.MembershipDelta, m.RegistrarStatus):  # fmt: skip
        assert not secretive & set(model.model_fields), model.__name__


def test_delta_revisions_must_move_forward():
    with pytest.raises(ValueError, match="to_revision"):
        m.MembershipDelta(mesh="m", from_revision=3, to_revision=3, published_at=0.0)


def test_member_record_rejects_bad_ip():
    with pytest.raises(ValueError):
        m.MemberRecord(
            node_id="n1", name="a", mesh_ip="300.1.1.1", public_key=KEY, listen_port=1,
            state=m.MemberState.ACTIVE, revision=1, updated_at=0.0,
        )


def test_endpoint_str_brackets_ipv6():
    assert str(m.Endpoint(host="fd00::1", port=5)) == "[fd00::1]:5"
    assert str(m.Endpoint(host="10.0.0.1", port=5)) == "10.0.0.1:5"


class _Settings(BaseModel):
    mesh: str = "mesh"
    interval: float = 5.0
    broker: BrokerSettings = BrokerSettings()


def test_settings_sources_in_order(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('mesh = "file"\ninterval = 2\n[broker]\nurl = "mqtt://file:1"\n')
    env = {"MESHVPN_INTERVAL": "3.5", "MESHVPN_BROKER__USERNAME": "u", "OTHER": "x", "MESHVPN_UNKNOWN": "y"}
    s = load_settings(_Settings, path=path, environ=env, overrides={"mesh": "flag", "broker.url": None})
    assert (s.mesh, s.interval, s.broker.url, s.broker.username) == ("flag", 3.5, "mqtt://file:1", "u")


def test_settings_errors_name_the_problem(tmp_path):
    with pytest.raises(ContractError, match="cannot read settings file"):
        load_settings(_Settings, path=tmp_path / "missing.toml", environ={})
    with pytest.raises(ContractError, match="invalid _Settings"):
        load_settings(_Settings, environ={"MESHVPN_INTERVAL": "soon"})


@pytest.mark.parametrize(
    ("url", "expected"),
    [("mqtt://h:1", ("h", 1, False)), ("mqtts://h", ("h", 8883, True)), ("mqtt://127.0.0.1", ("127.0.0.1", 1883, False))],
)
def test_broker_url(url, expected):
    assert BrokerSettings(url=url).host_port() == expected


def test_broker_url_rejects_other_schemes():
    with pytest.raises(ContractError):
        BrokerSettings(url="http://h:1").host_port()
