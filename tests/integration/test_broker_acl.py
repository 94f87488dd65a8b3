"""Both brokers (Mosquitto with the dynamic security plugin as shipped, and the embedded amqtt broker) enforce
exactly meshcontract.access: the whole matrix of credential kinds x topic families x publish / subscribe /
receive (live and retained), over real MQTT connections.

Denied publishes are dropped silently (both brokers still PUBACK them). A publish the broker acknowledged has
been routed, so a registrar subscribed to everything proves a denial by receiving a barrier it publishes after
those acknowledgements, but never the denied message. Deliveries to one client are in order, so a barrier also
closes every receive check.
"""

from __future__ import annotations

import pytest
from brokers import MosquittoBroker, ProbeClient, free_port

from broker.embedded import EmbeddedBroker
from broker.errors import BrokerStartError
from broker.settings import BrokerServerSettings
from meshcontract import access, topics
from meshcontract.access import hash_password, render_password_file
from meshcontract.topics import Kind

MESH, OTHER = "m1", "m2"
USERS = {"registrar": "reg-pw", "observer": "obs-pw", "n1": "n1-pw", "n2": "n2-pw"}
SUBACK_REFUSED = 0x80


def t(kind: Kind, node: str | None = None, mesh: str = MESH) -> str:
    return topics.build(mesh, kind, node)


def connect(broker, user: str, password: str | None = None, **kw) -> ProbeClient:
    client = ProbeClient(
        broker, client_id=kw.pop("client_id", user), username=user, password=password or USERS[user], **kw
    )
    assert client.rc == 0, f"{user} refused: {client.rc}"
    return client


@pytest.fixture
def acl_broker(any_broker):
    return any_broker(users=dict(USERS), mesh=MESH)


def all_topics() -> list[str]:
    """One concrete topic of every family, for this mesh and another, for n1 and n2 where per node."""
    out = []
    for mesh in (MESH, OTHER):
        for kind in Kind:
            if kind in topics.PER_NODE:
                out += [t(kind, "n1", mesh), t(kind, "n2", mesh)]
            else:
                out.append(t(kind, None, mesh))
    return out


def bound_mesh(broker, user: str) -> str | None:
    # The registrar runs the embedded broker bound to its one mesh: every account's rights end there. On
    # Mosquitto node accounts are bound to their mesh (literal topics); the registrar's and the observer's
    # rights span the meshes a shared Mosquitto may serve.
    if not isinstance(broker, MosquittoBroker) or access.role_of(user) is access.Role.NODE:
        return MESH
    return None


def expected(broker, user: str, check, topic: str) -> bool:
    return check(user, topic, mesh=bound_mesh(broker, user))


@pytest.mark.parametrize("user", ["registrar", "observer", "n1"])
def test_the_access_matrix(acl_broker, user):
    """Every cell (topic x publish / subscribe / receive live / receive retained) matches access.py."""
    topics_ = all_topics()
    registrar = connect(acl_broker, "registrar", client_id="registrar")
    assert registrar.subscribe("meshvpn/#") == 1
    violations: list[tuple] = []
    cells = 0
    # Retained first: every topic holds a retained message before the client subscribes.
    for topic in topics_:
        registrar.publish(topic, b"retained:" + topic.encode(), retain=True)
    if user == "registrar":
        client = registrar
    else:
        client = connect(acl_broker, user)
    # Subscribe: each concrete topic on its own, and wildcard filters a node must never hold.
    granted = {}
    filters = topics_ + ["meshvpn/#", f"meshvpn/v1/{MESH}/#", f"meshvpn/v1/{MESH}/+/n2", "#"]
    for topic_filter in filters:
        if user == "registrar" and topic_filter != "#":
            granted[topic_filter] = True
            continue
        ok = client.subscribe(topic_filter) != SUBACK_REFUSED
        want = access.may_subscribe(user, topic_filter, mesh=bound_mesh(acl_broker, user))
        cells += 1
        if ok != want:
            violations.append(("subscribe", topic_filter, ok, want))
        granted[topic_filter] = ok
    # Retained deliveries came with the SUBACKs; a fresh retained barrier after them closes the check.
    barrier = t(Kind.REGISTRAR) if user != "registrar" else t(Kind.SNAPSHOT)
    registrar.publish(barrier, b"barrier-1", retain=True)
    client.expect(barrier, b"barrier-1", timeout=10)
    got_retained = {topic for topic, payload in client.received() if payload.startswith(b"retained:")}
    for topic in topics_:
        if user == "registrar":
            continue  # it subscribed to everything up front: retained delivery to it is not in question
        want = granted[topic] and expected(acl_broker, user, access.may_receive, topic)
        # The wildcard filters granted also deliver retained messages: a node holds none, the observer's
        # meshvpn/# is filtered by receive rights like everything else.
        if user == "observer":
            want = expected(acl_broker, user, access.may_receive, topic)
        cells += 1
        if (topic in got_retained) != want:
            violations.append(("receive retained", topic, topic in got_retained, want))
    # Live receive: the registrar publishes to every topic, then a barrier.
    client.seen.clear()
    for topic in topics_:
        registrar.publish(topic, b"live:" + topic.encode())
    registrar.publish(barrier, b"barrier-2", retain=True)
    client.expect(barrier, b"barrier-2", timeout=10)
    got_live = {topic for topic, payload in client.received() if payload.startswith(b"live:")}
    for topic in topics_:
        want = expected(acl_broker, user, access.may_receive, topic) and (
            user != "n1" or granted.get(topic, False)
        )
        cells += 1
        if (topic in got_live) != want:
            violations.append(("receive", topic, topic in got_live, want))
    # Publish: every topic, acknowledged (so routed), then the registrar's barrier.
    if user != "registrar":
        registrar.seen.clear()
        for topic in topics_:
            client.publish(topic, b"from:" + user.encode())
        registrar.publish(t(Kind.REGISTRAR), b"barrier-3", retain=True)
        registrar.expect(t(Kind.REGISTRAR), b"barrier-3", timeout=10)
        published = {topic for topic, payload in registrar.received() if payload == b"from:" + user.encode()}
        for topic in topics_:
            want = expected(acl_broker, user, access.may_publish, topic)
            cells += 1
            if (topic in published) != want:
                violations.append(("publish", topic, topic in published, want))
    print(f"{acl_broker.kind} {user}: {cells} cells tried, {len(violations)} violations")
    assert violations == [], violations


def test_another_meshs_node_can_do_nothing_here(any_broker):
    """A node enrolled in another mesh on a shared Mosquitto has an account, but no right in this mesh."""
    broker = any_broker(users={"registrar": USERS["registrar"]}, mesh=MESH)
    if not isinstance(broker, MosquittoBroker):
        pytest.skip("an embedded broker serves one mesh: another mesh's nodes have no account on it at all")
    broker.mesh = OTHER
    broker.add_user("x1", "x1-pw")  # a node of mesh m2
    registrar = connect(broker, "registrar")
    registrar.subscribe("meshvpn/#")
    stranger = connect(broker, "x1", "x1-pw")
    for kind in (Kind.SNAPSHOT, Kind.DELTA, Kind.REGISTRAR):
        assert stranger.subscribe(t(kind)) == SUBACK_REFUSED
    assert stranger.subscribe(t(Kind.SNAPSHOT, mesh=OTHER)) != SUBACK_REFUSED, "its own mesh is fine"
    for kind in (Kind.REGISTER, Kind.STATUS, Kind.HEARTBEAT):
        stranger.publish(t(kind, "x1"), b"stranger")
    registrar.publish(t(Kind.REGISTRAR), b"barrier", retain=True)
    registrar.expect(t(Kind.REGISTRAR), b"barrier")
    assert [m for m in registrar.received() if m[1] == b"stranger"] == []


@pytest.mark.parametrize(
    ("username", "password"),
    [("n1", "wrong"), ("n1", ""), ("nobody", "x"), ("registrar", "n1-pw"), ("n1", "join:a-token")],
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


def test_nobody_can_use_another_accounts_client_id(acl_broker):
    """Issue 11: the observer connected with the registrar's client id and kicked its session 12 times in 10 s.
    The embedded broker refuses a client id other than the username; Mosquitto replaces it by the username."""
    registrar = connect(acl_broker, "registrar")
    registrar.subscribe("meshvpn/#")
    for user, client_id in [("observer", "registrar"), ("n1", "registrar"), ("n1", "n2")]:
        squatter = ProbeClient(acl_broker, client_id=client_id, username=user, password=USERS[user])
        squatter.close() if squatter.rc == 0 else squatter.client.loop_stop()
    registrar.publish(t(Kind.REGISTRAR), b"still here", retain=True)
    registrar.expect(t(Kind.REGISTRAR), b"still here")
    assert not registrar.disconnected.is_set(), "the registrar's session was never taken over"


def test_users_added_while_running_can_log_in_and_removed_ones_are_cut_off(acl_broker):
    acl_broker.add_user("n3", "n3-pw")
    client = ProbeClient(acl_broker, client_id="n3", username="n3", password="n3-pw")
    assert client.rc == 0
    acl_broker.remove_user("n3")
    assert client.disconnected.wait(10), "a removed account's session is dropped"
    again = ProbeClient(acl_broker, client_id="n3", username="n3", password="n3-pw")
    again.client.loop_stop()
    assert again.rc != 0


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
                         will=(t(Kind.STATUS, "n1"), "forged offline", True))  # fmt: skip
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


def test_oversized_packets_are_refused(acl_broker):
    """Issue 11: both brokers took a 32 MiB retained status. Past the packet limit the connection is closed and
    nothing is kept."""
    registrar = connect(acl_broker, "registrar")
    registrar.subscribe("meshvpn/#")
    node = connect(acl_broker, "n1")
    node.client.publish(t(Kind.STATUS, "n1"), b"x" * (5 * 1024 * 1024), qos=0, retain=True)
    assert node.disconnected.wait(15), "the broker closes a connection that sends an oversized packet"
    late = connect(acl_broker, "observer")
    late.subscribe(t(Kind.STATUS, "n1"))
    registrar.publish(t(Kind.STATUS, "n2"), b"barrier", retain=True)
    late.subscribe(t(Kind.STATUS, "n2"))
    late.expect(t(Kind.STATUS, "n2"), b"barrier")
    assert all(topic != t(Kind.STATUS, "n1") for topic, _ in late.received()), "nothing of it was retained"


# --- embedded broker only ---------------------------------------------------------------------------------------


def test_embedded_failed_logins_are_rate_limited_per_source(tmp_path):
    password_file = tmp_path / "passwords"
    password_file.write_text(render_password_file({"n1": hash_password("right")}))
    settings = BrokerServerSettings(
        port=free_port(), password_file=password_file, failed_logins_burst=3, failed_logins_per_s=0.01
    )
    with EmbeddedBroker(settings) as broker:
        for _ in range(3):
            wrong = ProbeClient(broker.url, client_id="n1", username="n1", password="wrong")
            wrong.client.loop_stop()
            assert wrong.rc != 0
        right = ProbeClient(broker.url, client_id="n1", username="n1", password="right")
        right.client.loop_stop()
        assert right.rc != 0, "after the allowance even the right password waits: guessing costs time"


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
