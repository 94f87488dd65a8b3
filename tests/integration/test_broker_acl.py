"""Both brokers (Mosquitto with broker/mosquitto/*.conf, and the embedded amqtt broker) enforce the same access
rules as meshcontract.access: checked here end to end over real MQTT connections.

Denied publishes are dropped silently (both brokers still PUBACK them), so a denial is proven by a registrar
subscribed to everything that receives a later, allowed message from the same client (a barrier: a client's
messages are delivered in order) but never the denied one.
"""

from __future__ import annotations

import pytest
from brokers import ProbeClient, free_port

from broker.embedded import EmbeddedBroker
from broker.errors import BrokerStartError
from broker.settings import BrokerServerSettings
from meshcontract import topics
from meshcontract.access import JOIN_PASSWORD_PREFIX, hash_password, render_password_file
from meshcontract.topics import Kind

MESH = "m1"
USERS = {"registrar": "reg-pw", "observer": "obs-pw", "n1": "n1-pw", "n2": "n2-pw"}
SUBACK_REFUSED = 0x80


def t(kind: Kind, node: str | None = None) -> str:
    return topics.build(MESH, kind, node)


def connect(broker, user: str, **kw) -> ProbeClient:
    client = ProbeClient(broker, client_id=kw.pop("client_id", user), username=user, password=USERS[user], **kw)
    assert client.rc == 0, f"{user} refused: {client.rc}"
    return client


@pytest.fixture
def acl_broker(any_broker):
    return any_broker(users=USERS)


NODE_PUBLISH_ALLOWED = [t(Kind.REGISTER, "n1"), t(Kind.STATUS, "n1"), t(Kind.HEARTBEAT, "n1")]
NODE_PUBLISH_DENIED = [
    t(Kind.REGISTER, "n2"),
    t(Kind.STATUS, "n2"),
    t(Kind.HEARTBEAT, "n2"),
    t(Kind.REPLY, "n1"),
    t(Kind.REPLY, "n2"),
    t(Kind.MEMBERS, "n1"),
    t(Kind.ROSTER),
    t(Kind.REGISTRAR),
    "meshvpn/v1/m1/status/n1/extra",
    "other/topic",
]


def test_node_publishes_only_its_own_register_status_heartbeat(acl_broker):
    registrar = connect(acl_broker, "registrar")
    assert registrar.subscribe("meshvpn/#") == 1
    node = connect(acl_broker, "n1")
    for topic in NODE_PUBLISH_DENIED:
        node.publish(topic, f"denied {topic}")
    for topic in NODE_PUBLISH_ALLOWED:
        node.publish(topic, f"allowed {topic}")
    for topic in NODE_PUBLISH_ALLOWED:
        registrar.expect(topic, f"allowed {topic}")
    # A second barrier after the allowed ones: everything n1 sent before it has been routed.
    node.publish(t(Kind.HEARTBEAT, "n1"), "barrier")
    registrar.expect(t(Kind.HEARTBEAT, "n1"), "barrier")
    got = {topic for topic, payload in registrar.received() if payload.startswith(b"denied")}
    assert got == set()


NODE_READABLE = [t(Kind.MEMBERS, "n2"), t(Kind.ROSTER), t(Kind.REGISTRAR), t(Kind.REPLY, "n1")]
NODE_UNREADABLE = [t(Kind.REPLY, "n2"), t(Kind.STATUS, "n2"), t(Kind.REGISTER, "n2"), t(Kind.HEARTBEAT, "n2")]


def test_node_receives_membership_and_its_own_replies_only(acl_broker):
    registrar = connect(acl_broker, "registrar")
    node = connect(acl_broker, "n1")
    allowed_filters = [topics.subscription(MESH, Kind.MEMBERS), t(Kind.ROSTER), t(Kind.REGISTRAR), t(Kind.REPLY, "n1")]
    for topic_filter in allowed_filters:
        assert node.subscribe(topic_filter) == 1, topic_filter
    # The embedded broker refuses these in the SUBACK; Mosquitto 2.0.11 grants them and filters at delivery.
    # Either way nothing unreadable may arrive, which is what is checked below.
    for topic_filter in ["#", "meshvpn/#", topics.mesh_filter(MESH), t(Kind.REPLY, "n2"),
                         topics.subscription(MESH, Kind.STATUS)]:
        node.subscribe(topic_filter)
    for topic in NODE_UNREADABLE:
        registrar.publish(topic, f"secret {topic}")
    for topic in NODE_READABLE:
        registrar.publish(topic, f"for all {topic}")
    for topic in NODE_READABLE:
        node.expect(topic, f"for all {topic}")
    registrar.publish(t(Kind.REPLY, "n1"), "barrier")
    node.expect(t(Kind.REPLY, "n1"), "barrier")
    assert [m for m in node.received() if m[1].startswith(b"secret")] == []


def test_observer_reads_everything_and_writes_nothing(acl_broker):
    registrar = connect(acl_broker, "registrar")
    registrar.subscribe("meshvpn/#")
    observer = connect(acl_broker, "observer")
    assert observer.subscribe(topics.mesh_filter(MESH)) == 1
    for topic in [t(Kind.STATUS, "observer"), t(Kind.ROSTER), t(Kind.STATUS, "n1")]:
        observer.publish(topic, "denied")
    node = connect(acl_broker, "n1")
    node.publish(t(Kind.STATUS, "n1"), "online")
    observer.expect(t(Kind.STATUS, "n1"), "online")
    registrar.expect(t(Kind.STATUS, "n1"), "online")
    assert [m for m in registrar.received() if m[1] == b"denied"] == []


@pytest.mark.parametrize(
    ("username", "password"),
    [("n1", "wrong"), ("n1", ""), ("nobody", "x"), ("registrar", "n1-pw"), ("n1", JOIN_PASSWORD_PREFIX + "tok")],
)
def test_bad_credentials_are_refused(acl_broker, username, password):
    client = ProbeClient(acl_broker, client_id=username, username=username, password=password)
    try:
        assert client.rc != 0
    finally:
        client.client.loop_stop()


def test_anonymous_is_refused_when_users_are_set(acl_broker):
    client = ProbeClient(acl_broker, client_id="")
    try:
        assert client.rc != 0
    finally:
        client.client.loop_stop()


def test_users_added_while_running_can_log_in(acl_broker):
    acl_broker.add_user("n3", "n3-pw")
    client = ProbeClient(acl_broker, client_id="n3", username="n3", password="n3-pw")
    assert client.rc == 0
    client.close()


def test_open_broker_lets_anyone_do_anything(any_broker):
    broker = any_broker(users=None)
    with ProbeClient(broker) as sub, ProbeClient(broker, username="whoever", password="x") as pub:
        assert sub.subscribe("#") == 1
        pub.publish("anything/at/all", "x")
        sub.expect("anything/at/all", "x")


def test_forged_will_is_never_delivered(acl_broker):
    """A node may not set a will on another node's status: the embedded broker refuses the CONNECT, Mosquitto
    accepts it but drops the will when it fires. Either way the forged status never arrives."""
    registrar = connect(acl_broker, "registrar")
    registrar.subscribe("meshvpn/#")
    forger = ProbeClient(acl_broker, client_id="n2", username="n2", password=USERS["n2"],
                         will=(t(Kind.STATUS, "n1"), "forged offline", True))
    if forger.rc == 0:  # Mosquitto: cut the connection so the will fires
        forger.client.loop_stop()
        forger.client.socket().close()
    else:
        forger.client.loop_stop()
    node = connect(acl_broker, "n1")
    # Barrier: the forger's disconnect was handled before n2's next connection is accepted.
    n2 = connect(acl_broker, "n2")
    n2.publish(t(Kind.STATUS, "n2"), "barrier")
    registrar.expect(t(Kind.STATUS, "n2"), "barrier")
    node.publish(t(Kind.STATUS, "n1"), "online")
    registrar.expect(t(Kind.STATUS, "n1"), "online")
    assert (t(Kind.STATUS, "n1"), b"forged offline") not in registrar.received()


# --- embedded broker only ---------------------------------------------------------------------------------------


@pytest.fixture
def embedded_with_tokens(tmp_path):
    """An in-process EmbeddedBroker whose token verifier accepts token "good-token" for any node."""
    password_file = tmp_path / "passwords"
    password_file.write_text(render_password_file({"registrar": hash_password(USERS["registrar"])}))
    calls: list[tuple[str, str]] = []

    def verify(username: str, token: str) -> bool:
        calls.append((username, token))
        return token == "good-token"

    settings = BrokerServerSettings(port=free_port(), password_file=password_file)
    with EmbeddedBroker(settings, token_verifier=verify) as broker:
        broker.calls = calls
        yield broker


def test_join_token_login_gets_the_node_acl(embedded_with_tokens):
    broker = embedded_with_tokens
    registrar = ProbeClient(broker.url, client_id="registrar", username="registrar", password=USERS["registrar"])
    registrar.subscribe("meshvpn/#")
    node = ProbeClient(broker.url, client_id="n9", username="n9", password=JOIN_PASSWORD_PREFIX + "good-token")
    assert node.rc == 0
    assert broker.calls == [("n9", "good-token")]
    node.publish(t(Kind.REGISTER, "n5"), "denied")
    node.publish(t(Kind.REGISTER, "n9"), "hello")
    registrar.expect(t(Kind.REGISTER, "n9"), "hello")
    assert (t(Kind.REGISTER, "n5"), b"denied") not in registrar.received()


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("n9", JOIN_PASSWORD_PREFIX + "bad-token"),
        ("registrar", JOIN_PASSWORD_PREFIX + "good-token"),  # only node names may join with a token
        ("observer", JOIN_PASSWORD_PREFIX + "good-token"),
    ],
)
def test_join_token_refusals(embedded_with_tokens, username, password):
    client = ProbeClient(embedded_with_tokens.url, client_id=username, username=username, password=password)
    client.client.loop_stop()
    assert client.rc != 0


def test_embedded_refuses_node_with_foreign_client_id(tmp_path):
    """Mosquitto forces client id = username (use_username_as_clientid); the embedded broker refuses others,
    so no node can hold or take over another node's session."""
    from brokers import start_embedded

    with start_embedded(tmp_path, users=USERS) as broker:
        for client_id in ["n2", "something-else"]:
            client = ProbeClient(broker, client_id=client_id, username="n1", password=USERS["n1"])
            client.client.loop_stop()
            assert client.rc != 0, client_id


def test_embedded_restarts_on_its_port_and_reports_a_port_in_use(tmp_path):
    password_file = tmp_path / "passwords"
    password_file.write_text(render_password_file({"n1": hash_password("pw")}))
    settings = BrokerServerSettings(port=free_port(), password_file=password_file)
    broker = EmbeddedBroker(settings)
    broker.start()
    try:
        with pytest.raises(BrokerStartError, match="cannot listen"):
            EmbeddedBroker(settings).start()
        broker.stop()
        broker.start()
        client = ProbeClient(broker.url, client_id="n1", username="n1", password="pw")
        assert client.rc == 0
        client.close()
    finally:
        broker.stop()
