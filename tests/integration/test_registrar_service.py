"""The service's single writer without a broker: bursts larger than one group commit lose nothing, an enrolling
node's broker account is made before its admission is committed (and a failure there commits nothing), removal
deletes the account, orphan accounts are reconciled at start, metrics can be read while the writer counts, and a
failing command is counted and answered."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from brokers import free_port
from polling import wait_for

from meshcontract import access, topics
from meshcontract.messages import EnrollRequest, MeshSettings
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

    def make(accounts=None, store=None) -> tuple[service.RegistrarService, MemoryStore]:
        store = store if store is not None else MemoryStore()
        svc = service.RegistrarService(
            config=_config(),
            store=store,
            broker=BrokerSettings(url=f"mqtt://127.0.0.1:{free_port()}"),  # nobody listens: replies go nowhere
            network="10.9.0.0/16",
            quarantine_s=60,
            signer=Signer.generate(),
            accounts=accounts,
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
