"""The service's single writer without a broker: bursts larger than one group commit lose nothing, a node's own
broker password is stored before its admission is committed (never replaced, never over HTTP re-registration),
metrics can be read while the writer counts, and a failing command is counted and answered."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from brokers import free_port
from polling import wait_for
from registrar.credentials import MemoryCredentials

from meshcontract import topics
from meshcontract.messages import MeshSettings
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings
from registrar import engine, service, writer
from registrar.api import render_metrics
from registrar.errors import CredentialsError
from registrar.membership import LivenessPolicy
from registrar.store import MemoryStore


def test_burst_larger_than_a_batch_is_fully_applied():
    config = engine.Config(
        mesh=MeshSettings(
            mesh="lab",
            network="10.9.0.0/16",
            heartbeat_interval_s=1,
            heartbeat_ttl_s=5,
            persistent_keepalive_s=0,
            mtu=1420,
        ),
        policy=LivenessPolicy(ttl_s=5, expiry_s=60, grace_s=6),
        require_token=False,
    )
    store = MemoryStore()
    svc = service.RegistrarService(
        config=config,
        store=store,
        broker=BrokerSettings(url=f"mqtt://127.0.0.1:{free_port()}"),  # nobody listens: replies go nowhere
        network="10.9.0.0/16",
        quarantine_s=60,
    )
    svc.start()
    try:
        n = writer.MAX_BATCH * 2 + 37
        for i in range(n):
            body = {
                "request_id": f"burst-{i:05d}",
                "node_id": f"n{i}",
                "name": f"n{i}",
                "public_key": base64.b64encode(i.to_bytes(4, "big") * 8).decode(),
                "listen_port": 51820,
                "epoch": 1,
            }
            # what paho does with a message: call the link's on_message, which only enqueues
            svc._link._on_message(
                None, None, _Msg(topics.build("lab", Kind.REGISTER, f"n{i}"), json.dumps(body).encode())
            )
        wait_for(lambda: len(svc.state.membership.members) == n, timeout=30, what=f"{n} members")
        assert len(store.members) == n and store.revision == n
        assert store.commits < n  # group commit: far fewer transactions than registrations
        ips = [m.mesh_ip for m in svc.state.membership.members.values()]
        assert len(set(ips)) == n
    finally:
        svc.stop()


class _Msg:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload


def _config() -> engine.Config:
    return engine.Config(
        mesh=MeshSettings(
            mesh="lab",
            network="10.9.0.0/16",
            heartbeat_interval_s=1,
            heartbeat_ttl_s=5,
            persistent_keepalive_s=0,
            mtu=1420,
        ),
        policy=LivenessPolicy(ttl_s=5, expiry_s=60, grace_s=6),
        require_token=False,
    )


def _request(node: str, *, epoch: int = 1, password: str | None = None, n: int = 1) -> bytes:
    body = {
        "request_id": f"req-{node}-{epoch}",
        "node_id": node,
        "name": node,
        "public_key": base64.b64encode(n.to_bytes(4, "big") * 8).decode(),
        "listen_port": 51820,
        "epoch": epoch,
    }
    if password is not None:
        body["broker_password"] = password
    return json.dumps(body).encode()


class _FailingCredentials(MemoryCredentials):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def adopt(self, passwords):
        if self.fail:
            raise CredentialsError("disk full")
        return super().adopt(passwords)


@pytest.fixture
def running():
    made = []

    def make(credentials) -> tuple[service.RegistrarService, MemoryStore]:
        store = MemoryStore()
        svc = service.RegistrarService(
            config=_config(),
            store=store,
            broker=BrokerSettings(url=f"mqtt://127.0.0.1:{free_port()}"),  # nobody listens
            network="10.9.0.0/16",
            quarantine_s=60,
            credentials=credentials,
        )
        svc.start()
        made.append(svc)
        return svc, store

    try:
        yield make
    finally:
        for svc in made:
            svc.stop()


def test_own_password_stored_at_admission_and_never_replaced(running):
    creds = MemoryCredentials()
    svc, _ = running(creds)
    first = svc.register_payload(_request("n1", password="a" * 24)).reply
    assert first.ok and first.broker_password is None  # nothing secret travels back
    assert creds.passwords == {"n1": "a" * 24}
    again = svc.register_payload(_request("n1", epoch=2, password="b" * 24)).reply
    assert again.ok and again.mesh_ip == first.mesh_ip
    assert creds.passwords == {"n1": "a" * 24}  # an existing entry is never replaced


def test_reregistration_of_a_member_without_entry_does_not_set_credentials(running):
    # Re-registering needs no token and over HTTP proves nothing: it must not hand out a member's login.
    creds = MemoryCredentials()
    svc, _ = running(creds)
    assert svc.register_payload(_request("n1", password="a" * 24)).reply.ok
    creds.passwords.clear()  # e.g. an operator removed the entry
    assert svc.register_payload(_request("n1", epoch=2, password="x" * 24)).reply.ok
    assert creds.passwords == {}


def test_password_file_failure_commits_nothing_and_retry_succeeds(running):
    creds = _FailingCredentials()
    svc, store = running(creds)
    reply = svc.register_payload(_request("n1", password="a" * 24)).reply
    assert not reply.ok and "credentials" in reply.error.message
    assert store.members == {} and "n1" not in svc.state.membership.members  # no token spent, no member
    creds.fail = False
    reply = svc.register_payload(_request("n1", epoch=2, password="a" * 24)).reply
    assert reply.ok and creds.passwords == {"n1": "a" * 24} and "n1" in store.members


def test_older_agent_without_own_password_still_gets_one_issued(running):
    creds = MemoryCredentials()
    svc, _ = running(creds)
    reply = svc.register_payload(_request("n1")).reply
    assert reply.ok and reply.broker_password == creds.passwords["n1"]
    assert svc.register_payload(_request("n1", epoch=2)).reply.broker_password is None


def test_metrics_can_be_read_while_the_writer_counts(running):
    """The HTTP thread reads the counters while the writer adds to them (it used to iterate the writer's dict)."""
    svc, _ = running(None)
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
    n = 3000
    try:
        for i in range(n):
            # valid registrations, junk and heartbeats of strangers: registrations, rejected, ignored all move
            kind, payload = [
                (Kind.REGISTER, _request(f"m{i}", n=i + 1)),
                (Kind.STATUS, b"not json"),
                (Kind.HEARTBEAT, json.dumps({"node_id": f"m{i}", "epoch": 1, "seq": 1, "sent_at": 1.0}).encode()),
            ][i % 3]
            node = f"m{i}" if kind is not Kind.STATUS else "x"
            svc._link._on_message(None, None, _Msg(topics.build("lab", kind, node), payload))
        expected = {"messages": n, "registrations": n // 3, "rejected": n // 3, "ignored": n // 3}

        def counted() -> bool:
            snapshot = svc.counters
            return all(snapshot[key] == value for key, value in expected.items())

        wait_for(counted, timeout=60, what=f"every one of {n} messages counted")
    finally:
        done.set()
        for reader in readers:
            reader.join(10)
    assert not errors, errors[0]
    assert svc.metrics()["counter_messages"] == n


def test_a_failing_command_is_counted_and_answered(running):
    svc, _ = running(None)

    def broken(state, now):
        raise RuntimeError("a bug in a command")

    with pytest.raises(RuntimeError):
        svc.call(broken)
    assert svc.counters["internal_errors"] == 1
    assert "meshvpn_registrar_internal_errors_total 1" in render_metrics(svc.metrics())
    assert svc.register_payload(_request("n1")).reply.ok  # the writer goes on
