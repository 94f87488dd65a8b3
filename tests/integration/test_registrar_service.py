"""The service's single writer without a broker: bursts larger than one group commit lose nothing, an enrolling
node's broker account is made before its admission is committed (and a failure there commits nothing), removal
deletes the account, orphan accounts are reconciled at start, metrics can be read while the writer counts, a
failing command is counted and answered, and heartbeats that linger in the inbox keep their place and hold up
nothing."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from brokers import free_port
from polling import wait_for

from meshcontract import access, topics
from meshcontract.messages import EnrollRequest, MemberState, MeshSettings
from meshcontract.signing import Signer
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings
from registrar import engine, service, writer
from registrar.accounts import MemoryAccounts
from registrar.errors import CredentialsError
from registrar.liveness import LivenessPolicy
from registrar.metrics import render_metrics
from registrar.store import MemoryStore

PASSWORD = "node-password-000000000"


def _config() -> engine.Config:
    return engine.Config(
        mesh=MeshSettings(
            mesh="lab", network="10.9.0.0/16", heartbeat_interval_s=1, heartbeat_ttl_s=5, persistent_keepalive_s=0,
            mtu=1420,
        ),
        policy=LivenessPolicy(ttl_s=5, expiry_s=60, grace_s=6),
        require_token=False,
    )  # fmt: skip


def _key(n: int) -> str:
    return base64.b64encode(n.to_bytes(4, "big") * 8).decode()


def _enrollment(node: str, n: int = 1, password: str = PASSWORD) -> EnrollRequest:
    return EnrollRequest(
        node_id=node, name=node, public_key=_key(n), listen_port=51820, token="mvj_unused-token-000000000",
        password=password,
    )  # fmt: skip


def _request(node: str, *, epoch: int = 1, n: int = 1) -> bytes:
    body = {"request_id": f"req-{node}-{epoch}", "node_id": node, "name": node, "public_key": _key(n),
            "listen_port": 51820, "epoch": epoch}  # fmt: skip
    return json.dumps(body).encode()


class _Msg:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload


class _FailingAccounts(MemoryAccounts):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def ensure(self, accounts):
        if self.fail:
            raise CredentialsError("broker unreachable")
        super().ensure(accounts)


@pytest.fixture
def running():
    made = []

    def make(accounts=None, store=None, **options) -> tuple[service.RegistrarService, MemoryStore]:
        store = store if store is not None else MemoryStore()
        svc = service.RegistrarService(
            config=_config(),
            store=store,
            broker=BrokerSettings(url=f"mqtt://127.0.0.1:{free_port()}"),  # nobody listens: replies go nowhere
            network="10.9.0.0/16",
            quarantine_s=60,
            signer=Signer.generate(),
            accounts=accounts,
            **options,
        )
        svc.start()
        made.append(svc)
        return svc, store

    try:
        yield make
    finally:
        for svc in made:
            svc.stop()


def test_burst_larger_than_a_batch_is_fully_applied(running):
    svc, store = running()
    n = writer.MAX_BATCH * 2 + 37
    for i in range(n):
        assert svc.enroll(_enrollment(f"n{i}", i + 1)).enroll_reply.ok
    commits = store.commits
    for i in range(n):
        # what paho does with a message: call the link's on_message, which only enqueues
        svc._link._on_message(None, None, _Msg(topics.build("lab", Kind.REGISTER, f"n{i}"), _request(f"n{i}", n=i + 1)))
    wait_for(
        lambda: all(m.epoch == 1 for m in svc.state.membership.members.values()), timeout=30, what=f"{n} registered"
    )
    assert len(store.members) == n and all(m.epoch == 1 for m in store.members.values())
    assert store.commits - commits < n  # group commit: far fewer transactions than registrations
    assert len({m.mesh_ip for m in svc.state.membership.members.values()}) == n


def test_the_account_exists_before_the_admission_is_committed(running):
    accounts = MemoryAccounts()
    svc, store = running(accounts)
    reply = svc.enroll(_enrollment("n1")).enroll_reply
    assert reply.ok and accounts.passwords == {"n1": PASSWORD}
    member = store.members["n1"]
    assert access.verify_password(PASSWORD, member.password_hash), "the registrar keeps only the hash"
    assert PASSWORD not in json.dumps(reply.model_dump()), "nothing secret travels back"


def test_an_account_failure_commits_nothing_and_a_retry_succeeds(running):
    accounts = _FailingAccounts()
    svc, store = running(accounts)
    reply = svc.enroll(_enrollment("n1")).enroll_reply
    assert not reply.ok and "accounts" in reply.error.message
    assert store.members == {} and "n1" not in svc.state.membership.members  # no token spent, no member
    accounts.fail = False
    assert svc.enroll(_enrollment("n1")).enroll_reply.ok
    assert accounts.passwords == {"n1": PASSWORD} and "n1" in store.members


def test_removal_deletes_the_account(running):
    accounts = MemoryAccounts()
    svc, _ = running(accounts)
    assert svc.enroll(_enrollment("n1")).enroll_reply.ok
    outcome = svc.call(lambda state, now: engine.remove_member(state, "n1", now=now))
    assert outcome.removed and accounts.removed == ["n1"] and "n1" not in accounts.passwords


def test_orphan_accounts_are_deleted_at_start(running):
    """A crash after an account was made and before the enrollment was committed leaves an account without a
    member: no credential may outlive its membership."""
    accounts = MemoryAccounts()
    accounts.ensure({"orphan": "pw", "n1": PASSWORD})
    store = MemoryStore()
    first, _ = running(MemoryAccounts(), store)
    assert first.enroll(_enrollment("n1")).enroll_reply.ok
    first.stop()
    running(accounts, store)
    assert accounts.names() == {"n1"} and accounts.removed == ["orphan"]


def test_metrics_can_be_read_while_the_writer_counts(running):
    """The HTTP thread reads the counters while the writer adds to them (it used to iterate the writer's dict)."""
    svc, _ = running()
    n = 3000
    for i in range(0, n, 3):
        assert svc.enroll(_enrollment(f"m{i}", i + 1)).enroll_reply.ok
    before = dict(svc.counters)
    errors: list[BaseException] = []
    done = threading.Event()

    def read_metrics() -> None:
        while not done.is_set():
            try:
                render_metrics(svc.metrics())
                dict(svc.counters)
            except BaseException as exc:  # reported below
                errors.append(exc)
                return

    readers = [threading.Thread(target=read_metrics, daemon=True) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for i in range(n):
            # registrations, junk and heartbeats of strangers: registrations, rejected, ignored all move
            kind, payload = [
                (Kind.REGISTER, _request(f"m{i}", n=i + 1)),
                (Kind.STATUS, b"not json"),
                (Kind.HEARTBEAT, json.dumps({"node_id": f"m{i}", "epoch": 1, "seq": 1, "sent_at": 1.0}).encode()),
            ][i % 3]
            node = f"m{i}" if kind is not Kind.STATUS else f"x{i}"  # within every node's flood budget
            svc._link._on_message(None, None, _Msg(topics.build("lab", kind, node), payload))
        expected = {"messages": n, "registrations": n // 3, "rejected": n // 3, "ignored": n // 3}

        def counted() -> bool:
            snapshot = svc.counters
            return all(snapshot[key] - before[key] == value for key, value in expected.items())

        wait_for(counted, timeout=60, what=f"every one of {n} messages counted")
    finally:
        done.set()
        for reader in readers:
            reader.join(10)
    assert not errors, errors[0]
    assert svc.metrics()["counter_messages"] == n


def test_a_failing_command_is_counted_and_answered(running):
    svc, _ = running()

    def broken(state, now):
        raise RuntimeError("a bug in a command")

    with pytest.raises(RuntimeError):
        svc.call(broken)
    assert svc.counters["internal_errors"] == 1
    assert "meshvpn_registrar_internal_errors_total 1" in render_metrics(svc.metrics())
    assert svc.enroll(_enrollment("n1")).enroll_reply.ok  # the writer goes on


def _heartbeat(node: str, *, epoch: int = 1) -> bytes:
    return json.dumps({"node_id": node, "epoch": epoch, "seq": 1, "sent_at": 1.0}).encode()


def _offline(node: str, *, epoch: int = 1) -> bytes:
    return json.dumps({"node_id": node, "state": "offline", "epoch": epoch, "at": 1.0}).encode()


def _active(svc: service.RegistrarService, node: str, n: int = 1) -> float:
    """Enroll and register `node`; returns its last_seen once it is active."""
    assert svc.enroll(_enrollment(node, n)).enroll_reply.ok
    svc._link._on_message(None, None, _Msg(topics.build("lab", Kind.REGISTER, node), _request(node, n=n)))
    wait_for(lambda: svc.state.membership.members[node].epoch == 1, timeout=10, what=f"{node} registered")
    assert _state(svc, node) is MemberState.ACTIVE
    return svc.state.membership.members[node].last_seen


def _state(svc: service.RegistrarService, node: str) -> MemberState | None:
    member = svc.state.membership.members.get(node)
    return member.state if member is not None else None


def _send(svc: service.RegistrarService, kind: Kind, node: str, payload: bytes) -> None:
    svc._link._on_message(None, None, _Msg(topics.build("lab", kind, node), payload))


# No tick for an hour and a linger of a minute: only what is put after a lingering heartbeat can wake the writer.
SLOW = {"heartbeat_linger_s": 60.0, "tick_interval_s": 3600.0}


def test_a_lingering_heartbeat_is_decided_before_the_goodbye_put_after_it(running):
    svc, _ = running(**SLOW)
    seen = _active(svc, "n1")
    _send(svc, Kind.HEARTBEAT, "n1", _heartbeat("n1"))
    _send(svc, Kind.STATUS, "n1", _offline("n1"))
    wait_for(lambda: _state(svc, "n1") is not MemberState.ACTIVE, timeout=5, what="the goodbye decided promptly")
    member = svc.state.membership.members["n1"]
    # Decided the other way round, the heartbeat would have revived the member it came after.
    assert member.state is MemberState.UNREACHABLE and member.last_seen > seen


def test_a_registration_is_decided_at_once_while_heartbeats_linger(running):
    svc, _ = running(**SLOW)
    seen = {node: _active(svc, node, n) for n, node in enumerate(["n1", "n2", "n3"], start=1)}
    for node in ("n1", "n2"):
        _send(svc, Kind.HEARTBEAT, node, _heartbeat(node))
    _send(svc, Kind.REGISTER, "n3", _request("n3", epoch=2, n=3))
    wait_for(lambda: svc.state.membership.members["n3"].epoch == 2, timeout=5, what="the registration decided")
    members = svc.state.membership.members
    assert all(members[node].last_seen > seen[node] for node in ("n1", "n2")), "and the heartbeats before it"


def test_a_heartbeat_that_revives_a_member_does_not_linger(running):
    svc, _ = running(**SLOW)
    _active(svc, "n1")
    _send(svc, Kind.STATUS, "n1", _offline("n1"))
    wait_for(lambda: _state(svc, "n1") is MemberState.UNREACHABLE, timeout=5, what="n1 offline")
    _send(svc, Kind.HEARTBEAT, "n1", _heartbeat("n1"))
    wait_for(lambda: _state(svc, "n1") is MemberState.ACTIVE, timeout=5, what="n1 revived at once")


def test_heartbeats_alone_are_decided_once_they_have_lingered(running):
    svc, _ = running(heartbeat_linger_s=0.05, tick_interval_s=3600.0)
    seen = _active(svc, "n1")
    _send(svc, Kind.HEARTBEAT, "n1", _heartbeat("n1"))
    wait_for(lambda: svc.state.membership.members["n1"].last_seen > seen, timeout=5, what="last_seen moved")


def test_stop_decides_the_heartbeats_still_lingering(running):
    svc, store = running(**SLOW)
    seen = _active(svc, "n1")
    messages = svc.counters["messages"]
    _send(svc, Kind.HEARTBEAT, "n1", _heartbeat("n1"))
    svc.stop()
    assert svc.state.membership.members["n1"].last_seen > seen
    assert svc.counters["messages"] == messages + 1
