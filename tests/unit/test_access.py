"""meshcontract.access (who may do what on the broker; the password file), broker/mosquitto/acl.conf agreeing with
it, and broker.admission (the embedded broker's CONNECT rules). Pure tables, except the mosquitto_passwd check."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from broker import admission
from meshcontract import access, topics
from meshcontract.access import Role
from meshcontract.topics import Kind

ACL_CONF = Path(__file__).resolve().parents[2] / "broker" / "mosquitto" / "acl.conf"
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
    ("registrar", t(Kind.ROSTER), True),
    ("registrar", t(Kind.REGISTRAR), True),
    ("registrar", "other/topic", False),
    ("observer", t(Kind.STATUS, "n1"), False),
    ("observer", t(Kind.ROSTER), False),
    ("n1", t(Kind.REGISTER, "n1"), True),
    ("n1", t(Kind.STATUS, "n1"), True),
    ("n1", t(Kind.HEARTBEAT, "n1"), True),
    ("n1", t(Kind.STATUS, "n1", mesh="other-mesh"), True),
    ("n1", t(Kind.REGISTER, "n2"), False),
    ("n1", t(Kind.STATUS, "n2"), False),
    ("n1", t(Kind.HEARTBEAT, "n2"), False),
    ("n1", t(Kind.REPLY, "n1"), False),
    ("n1", t(Kind.MEMBERS, "n1"), False),
    ("n1", t(Kind.ROSTER), False),
    ("n1", t(Kind.REGISTRAR), False),
    ("n1", "meshvpn/v1/m1/status/n1/extra", False),
    ("n1", "meshvpn/v1/m1/status/+", False),
    ("n1", "meshvpn/v2/m1/status/n1", False),
    (None, t(Kind.STATUS, "n1"), False),
    ("Bad", t(Kind.STATUS, "n1"), False),
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
    ("n1", topics.subscription(M, Kind.MEMBERS), True),
    ("n1", t(Kind.MEMBERS, "n2"), True),
    ("n1", t(Kind.ROSTER), True),
    ("n1", t(Kind.REGISTRAR), True),
    ("n1", t(Kind.REPLY, "n1"), True),
    ("n1", t(Kind.REPLY, "n2"), False),
    ("n1", topics.subscription(M, Kind.REPLY), False),
    ("n1", topics.subscription(M, Kind.STATUS), False),
    ("n1", topics.subscription(M, Kind.REGISTER), False),
    ("n1", topics.subscription(M, Kind.HEARTBEAT), False),
    ("n1", "meshvpn/v1/m1/members/#", False),
    ("n1", "meshvpn/v1/+/members/+", False),
    ("n1", "meshvpn/v1/m1/#", False),
    ("n1", "meshvpn/#", False),
    ("n1", "#", False),
    ("n1", "+/+/+/+/+", False),
    (None, t(Kind.ROSTER), False),
]


@pytest.mark.parametrize(("user", "topic_filter", "allowed"), SUBSCRIBE)
def test_may_subscribe(user, topic_filter, allowed):
    assert access.may_subscribe(user, topic_filter) is allowed


RECEIVE = [
    ("registrar", t(Kind.STATUS, "n1"), True),
    ("observer", t(Kind.HEARTBEAT, "n1"), True),
    ("observer", "other/topic", False),
    ("n1", t(Kind.MEMBERS, "n2"), True),
    ("n1", t(Kind.ROSTER), True),
    ("n1", t(Kind.REGISTRAR), True),
    ("n1", t(Kind.REPLY, "n1"), True),
    ("n1", t(Kind.REPLY, "n2"), False),
    ("n1", t(Kind.STATUS, "n2"), False),
    ("n1", t(Kind.STATUS, "n1"), False),
    ("n1", t(Kind.REGISTER, "n2"), False),
    ("n1", t(Kind.HEARTBEAT, "n2"), False),
    (None, t(Kind.ROSTER), False),
]


@pytest.mark.parametrize(("user", "topic", "allowed"), RECEIVE)
def test_may_receive(user, topic, allowed):
    assert access.may_receive(user, topic) is allowed


def test_every_topic_a_subscription_grants_is_receivable():
    """may_subscribe never lets a node hold a filter matching a topic it may not receive: retained delivery on
    subscribe cannot leak through an allowed filter (the embedded broker checks may_receive anyway)."""
    for user in ("n1", "observer", "registrar"):
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


# --- broker/mosquitto/acl.conf agrees with access.py ------------------------------------------------------------


def _matches(topic_filter: str, topic: str) -> bool:
    f, t_ = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t_) or level not in ("+", t_[i]):
            return False
    return len(f) == len(t_)


def _acl_allows(rules: list[tuple[str | None, str, str]], user: str, topic: str, action: str) -> bool:
    """Mosquitto 2.0's default ACL check: a matching `deny` wins; else any matching rule granting `action`."""
    mine = [(acc, pat.replace("%u", user)) for owner, acc, pat in rules if owner in (user, "%pattern")]
    if any(acc == "deny" and _matches(pat, topic) for acc, pat in mine):
        return False
    return any(action in acc and _matches(pat, topic) for acc, pat in mine)  # "readwrite" holds both


def _parse_acl(text: str) -> list[tuple[str | None, str, str]]:
    rules: list[tuple[str | None, str, str]] = []
    user: str | None = None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
        elif words[0] == "topic":
            acc, pat = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            rules.append((user, acc, pat))
        elif words[0] == "pattern":
            acc, pat = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            rules.append(("%pattern", acc, pat))
        else:
            raise AssertionError(f"unexpected acl.conf line: {line!r}")
    return rules


def _all_topics() -> list[str]:
    out = ["other/topic", "meshvpn/v2/m1/status/n1", "meshvpn/v1/m1/status/n1/extra", "meshvpn/v1/m1/bogus/n1"]
    for mesh in (M, "m2"):
        for kind in Kind:
            if kind in topics.PER_NODE:
                out += [t(kind, node, mesh) for node in ("n1", "n2")]
            else:
                out.append(t(kind, None, mesh))
    return out


# "registrar" and "observer" are reserved usernames, so no node topic ever ends in them: not in the table.
@pytest.mark.parametrize("user", ["registrar", "observer", "n1", "n2"])
def test_mosquitto_acl_agrees_with_access(user):
    rules = _parse_acl(ACL_CONF.read_text())
    for topic in _all_topics():
        assert _acl_allows(rules, user, topic, "write") == access.may_publish(user, topic), (user, topic, "write")
        assert _acl_allows(rules, user, topic, "read") == access.may_receive(user, topic), (user, topic, "read")


def test_acl_parser_sees_every_rule():
    rules = _parse_acl(ACL_CONF.read_text())
    assert ("registrar", "readwrite", "meshvpn/#") in rules
    assert ("%pattern", "write", "meshvpn/v1/+/status/%u") in rules
    assert len([r for r in rules if r[0] == "%pattern"]) == 7


# --- broker.admission: the embedded broker's CONNECT rules ------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "client_id", "credentials_ok", "anonymous", "will", "refused"),
    [
        ("n1", "n1", True, False, None, False),
        ("n1", "n1", True, False, t(Kind.STATUS, "n1"), False),
        ("n1", "n1", True, False, t(Kind.STATUS, "n2"), True),  # forged will
        ("n1", "n1", True, False, t(Kind.ROSTER), True),
        ("n1", "n1", False, False, None, True),
        ("n1", "n2", True, False, None, True),  # would take over n2's session
        ("n1", "", True, False, None, True),
        ("registrar", "registrar-7", True, False, t(Kind.REGISTRAR), False),
        ("observer", "mosquitto_sub_1", True, False, None, False),
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
