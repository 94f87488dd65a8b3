"""meshcontract.access (who may do what on the broker; the password file), the Mosquitto dynamic security roles
built from it (registrar.accounts) agreeing with it, and broker.admission (the embedded broker's CONNECT rules).
Pure tables, except the mosquitto_passwd check."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from broker import admission
from meshcontract import access, topics
from meshcontract.access import Role
from meshcontract.topics import Kind
from registrar import accounts

M = "m1"


def t(kind: Kind, node: str | None = None, mesh: str = M) -> str:
    return topics.build(mesh, kind, node)


@pytest.mark.parametrize(
    ("username", "role"),
    [
        ("registrar", Role.REGISTRAR),
        ("observer", Role.OBSERVER),
        ("n1", Role.NODE),
        ("node-7_a", Role.NODE),
        ("meshvpn.admin", None),  # the dynamic security admin: no rights on meshvpn/ at all
        ("admin", None),  # reserved: never a node
        ("meshvpn", None),
        (None, None),
        ("", None),
        ("N1", None),
        ("n/1", None),
        ("n+", None),
        ("#", None),
        ("-n", None),
    ],
)
def test_role_of(username, role):
    assert access.role_of(username) is role


PUBLISH = [
    # (user, topic, allowed)
    ("registrar", t(Kind.REPLY, "n1"), True),
    ("registrar", t(Kind.MEMBERS, "n1"), True),
    ("registrar", t(Kind.SNAPSHOT), True),
    ("registrar", t(Kind.DELTA), True),
    ("registrar", t(Kind.REGISTRAR), True),
    ("registrar", "other/topic", False),
    ("observer", t(Kind.STATUS, "n1"), False),
    ("observer", t(Kind.SNAPSHOT), False),
    ("observer", t(Kind.REGISTER, "observer"), False),
    ("n1", t(Kind.REGISTER, "n1"), True),
    ("n1", t(Kind.STATUS, "n1"), True),
    ("n1", t(Kind.HEARTBEAT, "n1"), True),
    ("n1", t(Kind.STATUS, "n1", mesh="other-mesh"), True),  # unbound: any mesh (see the mesh-bound test)
    ("n1", t(Kind.REGISTER, "n2"), False),
    ("n1", t(Kind.STATUS, "n2"), False),
    ("n1", t(Kind.HEARTBEAT, "n2"), False),
    ("n1", t(Kind.REPLY, "n1"), False),
    ("n1", t(Kind.MEMBERS, "n1"), False),
    ("n1", t(Kind.SNAPSHOT), False),
    ("n1", t(Kind.DELTA), False),
    ("n1", t(Kind.REGISTRAR), False),
    ("n1", "meshvpn/v1/m1/status/n1/extra", False),
    ("n1", "meshvpn/v1/m1/status/+", False),
    ("n1", "meshvpn/v2/m1/status/n1", False),
    (None, t(Kind.STATUS, "n1"), False),
    ("Bad", t(Kind.STATUS, "n1"), False),
    ("meshvpn.admin", t(Kind.SNAPSHOT), False),
]


@pytest.mark.parametrize(("user", "topic", "allowed"), PUBLISH)
def test_may_publish(user, topic, allowed):
    assert access.may_publish(user, topic) is allowed


SUBSCRIBE = [
    ("registrar", "meshvpn/#", True),
    ("registrar", topics.subscription(M, Kind.REGISTER), True),
    ("registrar", "#", False),
    ("observer", "meshvpn/#", True),
    ("observer", topics.mesh_filter(M), True),
    ("observer", "#", False),
    ("n1", t(Kind.SNAPSHOT), True),
    ("n1", t(Kind.DELTA), True),
    ("n1", t(Kind.REGISTRAR), True),
    ("n1", t(Kind.REPLY, "n1"), True),
    ("n1", t(Kind.REPLY, "n2"), False),
    ("n1", topics.subscription(M, Kind.MEMBERS), False),
    ("n1", t(Kind.MEMBERS, "n2"), False),
    ("n1", topics.subscription(M, Kind.REPLY), False),
    ("n1", topics.subscription(M, Kind.STATUS), False),
    ("n1", topics.subscription(M, Kind.REGISTER), False),
    ("n1", topics.subscription(M, Kind.HEARTBEAT), False),
    ("n1", "meshvpn/v1/+/snapshot", False),
    ("n1", "meshvpn/v1/m1/#", False),
    ("n1", "meshvpn/#", False),
    ("n1", "#", False),
    ("n1", "+/+/+/+/+", False),
    (None, t(Kind.SNAPSHOT), False),
]


@pytest.mark.parametrize(("user", "topic_filter", "allowed"), SUBSCRIBE)
def test_may_subscribe(user, topic_filter, allowed):
    assert access.may_subscribe(user, topic_filter) is allowed


RECEIVE = [
    ("registrar", t(Kind.STATUS, "n1"), True),
    ("registrar", t(Kind.REGISTER, "n1"), True),
    ("observer", t(Kind.HEARTBEAT, "n1"), True),
    ("observer", t(Kind.STATUS, "n1"), True),
    ("observer", t(Kind.MEMBERS, "n1"), True),
    ("observer", t(Kind.SNAPSHOT), True),
    ("observer", t(Kind.DELTA), True),
    ("observer", t(Kind.REGISTRAR), True),
    # The observer reads nothing that logs in or answers a login (issue 11: a password read there was used).
    ("observer", t(Kind.REGISTER, "n1"), False),
    ("observer", t(Kind.REPLY, "n1"), False),
    ("observer", "other/topic", False),
    ("n1", t(Kind.SNAPSHOT), True),
    ("n1", t(Kind.DELTA), True),
    ("n1", t(Kind.REGISTRAR), True),
    ("n1", t(Kind.REPLY, "n1"), True),
    ("n1", t(Kind.MEMBERS, "n2"), False),
    ("n1", t(Kind.REPLY, "n2"), False),
    ("n1", t(Kind.STATUS, "n2"), False),
    ("n1", t(Kind.STATUS, "n1"), False),
    ("n1", t(Kind.REGISTER, "n2"), False),
    ("n1", t(Kind.HEARTBEAT, "n2"), False),
    (None, t(Kind.SNAPSHOT), False),
]


@pytest.mark.parametrize(("user", "topic", "allowed"), RECEIVE)
def test_may_receive(user, topic, allowed):
    assert access.may_receive(user, topic) is allowed


@pytest.mark.parametrize("user", ["registrar", "observer", "n1"])
def test_a_broker_bound_to_a_mesh_allows_nothing_in_another(user):
    for topic in _all_topics():
        if topics.parse(topic).mesh if _parses(topic) else None:
            other = topics.parse(topic).mesh != M
            if other:
                assert not access.may_publish(user, topic, mesh=M), (user, topic)
                assert not access.may_receive(user, topic, mesh=M), (user, topic)
    assert not access.may_subscribe("n1", t(Kind.SNAPSHOT, mesh="m2"), mesh=M)
    assert not access.may_subscribe("observer", "meshvpn/v1/m2/#", mesh=M)
    assert access.may_subscribe("observer", "meshvpn/#", mesh=M), "receives only its mesh's (may_receive)"


def _parses(topic: str) -> bool:
    try:
        topics.parse(topic)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("name", sorted(access.RESERVED))
def test_reserved_names_are_never_node_ids(name):
    assert not access.is_node_id(name)
    with pytest.raises(ValueError, match="reserved"):
        access.check_node_id(name)


def test_every_topic_a_node_subscription_grants_is_receivable():
    """may_subscribe never lets a node hold a filter matching a topic it may not receive: retained delivery on
    subscribe cannot leak through an allowed filter (both brokers check receiving anyway; the observer's wide
    filter relies on that check by design)."""
    for user in ("n1", "registrar"):
        for topic_filter in [f for u, f, ok in SUBSCRIBE if u == user and ok]:
            for topic in _all_topics():
                if _matches(topic_filter, topic):
                    assert access.may_receive(user, topic), (user, topic_filter, topic)


# --- password file --------------------------------------------------------------------------------------------


def test_hash_round_trip_and_format():
    hashed = access.hash_password("s3cret", salt=b"0123456789ab")
    assert hashed.startswith("$7$101$MDEyMzQ1Njc4OWFi$")
    assert access.verify_password("s3cret", hashed)
    assert not access.verify_password("s3cret ", hashed)
    assert access.hash_password("s3cret") != access.hash_password("s3cret")  # random salt


@pytest.mark.parametrize("hashed", ["", "plain", "$7$101$!!$!!", "$9$x$y$z", "$7$notanint$AAAA$AAAA"])
def test_verify_rejects_malformed_hashes(hashed):
    assert not access.verify_password("x", hashed)


def test_password_file_round_trip():
    entries = {"registrar": access.hash_password("a"), "n1": access.hash_password("b")}
    text = access.render_password_file(entries)
    assert text.splitlines()[0].startswith("n1:")  # sorted
    assert access.parse_password_file("# comment\n\n" + text) == entries


def test_hashes_written_by_mosquitto_passwd_verify(tmp_path):
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed (apt-get install mosquitto)")
    path = tmp_path / "passwords"
    path.write_text("")
    for user, password in [("registrar", "reg pw"), ("n1", "ünïcode-pw")]:
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True, capture_output=True)
    entries = access.parse_password_file(path.read_text())
    assert set(entries) == {"registrar", "n1"}
    assert entries["n1"].startswith("$7$101$")
    assert access.verify_password("reg pw", entries["registrar"])
    assert access.verify_password("ünïcode-pw", entries["n1"])
    assert not access.verify_password("reg pw", entries["n1"])


# --- the Mosquitto dynamic security roles agree with access.py --------------------------------------------------


def _matches(topic_filter: str, topic: str) -> bool:
    f, t_ = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t_) or level not in ("+", t_[i]):
            return False
    return len(f) == len(t_)


def _all_topics() -> list[str]:
    out = ["other/topic", "meshvpn/v2/m1/status/n1", "meshvpn/v1/m1/status/n1/extra", "meshvpn/v1/m1/bogus/n1"]
    for mesh in (M, "m2"):
        for kind in Kind:
            if kind in topics.PER_NODE:
                out += [t(kind, node, mesh) for node in ("n1", "n2")]
            else:
                out.append(t(kind, None, mesh))
    return out


def _dynsec_allows(roles: list, topic: str, acltype: str) -> bool:
    """Mosquitto's dynamic security check with default deny: any matching allow ACL of the client's roles."""
    return any(a["allow"] and a["acltype"] == acltype and _matches(a["topic"], topic) for r in roles for a in r.acls)


def _dynsec_roles(user: str) -> list:
    if user == access.REGISTRAR_USER:
        return [accounts.registrar_role()]
    if user == access.OBSERVER_USER:
        return [accounts.observer_role()]
    return [accounts.node_role(M, user), accounts.mesh_node_role(M)]


@pytest.mark.parametrize("user", ["registrar", "observer", "n1", "n2"])
def test_dynsec_roles_agree_with_access(user):
    """What Mosquitto lets an account publish and receive is exactly what access.py says, in the mesh its node
    roles were made for (a registrar's or observer's rights span meshes, as with mesh=None)."""
    mesh = M if access.role_of(user) is Role.NODE else None
    roles = _dynsec_roles(user)
    for topic in _all_topics():
        want_pub = access.may_publish(user, topic, mesh=mesh)
        want_recv = access.may_receive(user, topic, mesh=mesh)
        assert _dynsec_allows(roles, topic, "publishClientSend") == want_pub, (user, topic, "publish")
        assert _dynsec_allows(roles, topic, "publishClientReceive") == want_recv, (user, topic, "receive")


# --- broker.admission: the embedded broker's CONNECT rules ------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "client_id", "credentials_ok", "anonymous", "will", "refused"),
    [
        ("n1", "n1", True, False, None, False),
        ("n1", "n1", True, False, t(Kind.STATUS, "n1"), False),
        ("n1", "n1", True, False, t(Kind.STATUS, "n2"), True),  # forged will
        ("n1", "n1", True, False, t(Kind.SNAPSHOT), True),
        ("n1", "n1", False, False, None, True),
        ("n1", "n2", True, False, None, True),  # would take over n2's session
        ("n1", "", True, False, None, True),
        ("registrar", "registrar", True, False, t(Kind.REGISTRAR), False),
        ("registrar", "registrar-7", True, False, t(Kind.REGISTRAR), True),  # client id = username, for everyone
        ("observer", "observer", True, False, None, False),
        ("observer", "registrar", True, False, None, True),  # would take over the registrar's session
        ("observer", "observer", True, False, t(Kind.STATUS, "observer"), True),
        ("Bad", "Bad", True, False, None, True),
        (None, "", False, False, None, True),
        (None, "amqtt/xyz", False, True, None, False),
        (None, "n1", False, True, None, True),  # anonymous squatting a node's client id
        (None, "amqtt/xyz", False, True, t(Kind.STATUS, "n1"), True),
    ],
)
def test_admission(username, client_id, credentials_ok, anonymous, will, refused):
    reason = admission.refusal(
        username=username, client_id=client_id, credentials_ok=credentials_ok, allow_anonymous=anonymous,
        will_topic=will,
    )
    assert (reason is not None) is refused, reason
