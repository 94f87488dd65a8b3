"""The registrar over MQTT against both brokers (Mosquitto and the embedded amqtt), driven by real paho clients.

Brokers run with accounts and access rules, like production; the simulated nodes' broker accounts are made by the
test (the registrar here manages none), and they enroll through the service before they register over MQTT.
Short timings: heartbeat 0.3 s, TTL 1 s. Every wait is a poll on a condition with a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from brokers import free_port
from polling import wait_for

from meshcontract import messages, topics
from meshcontract.messages import (
    EnrollRequest,
    ErrorCode,
    Heartbeat,
    MemberRecord,
    MembershipSnapshot,
    MemberState,
    MeshSettings,
    NodeStatus,
    RegisterReply,
    RegistrarStatus,
)
from meshcontract.signing import Signer
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings, make_client
from registrar import engine, tokens
from registrar.liveness import LivenessPolicy
from registrar.service import RegistrarService
from registrar.store import SqliteStore

MESH = "lab"
NETWORK = "10.44.0.0/24"
HB_S, TTL_S, GRACE_S = 0.3, 1.0, 1.5
TOKEN = "mvj_integration-token-000000"
REPO = Path(__file__).resolve().parents[2]
NODES = [f"n{i}" for i in range(1, 6)]
USERS = {"registrar": "reg-pw", "observer": "obs-pw", **{n: f"{n}-password-000000" for n in NODES}}


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def settings_for(broker, user: str, password: str | None, keepalive: int = 2) -> BrokerSettings:
    return BrokerSettings(url=broker.url, username=user, password=password, keepalive_s=keepalive)


class Observer:
    """Subscribes to the whole mesh and keeps the newest retained view plus every member state it saw."""

    def __init__(self, broker, user: str = "observer", password: str = USERS["observer"]) -> None:
        self.members: dict[str, MemberRecord] = {}
        self.snapshot: MembershipSnapshot | None = None
        self.registrar: RegistrarStatus | None = None
        self.history: list[tuple[str, str]] = []  # (node, state) for every record received
        self.replies: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = make_client(settings_for(broker, user, password), client_id=f"{user}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(topics.mesh_filter(MESH), qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()
        assert self._subscribed.wait(10), "observer not subscribed"

    def _on_message(self, client, userdata, msg) -> None:
        parsed = topics.parse(msg.topic)
        with self._lock:
            if parsed.kind is Kind.MEMBERS:
                if msg.payload:
                    rec = messages.decode(MemberRecord, msg.payload)
                    self.members[parsed.node] = rec
                    self.history.append((parsed.node, rec.state.value))
                else:
                    self.members.pop(parsed.node, None)
                    self.history.append((parsed.node, "tombstone"))
            elif parsed.kind is Kind.SNAPSHOT and msg.payload:
                self.snapshot = messages.decode(
                    MembershipSnapshot, msg.payload, max_size=messages.MAX_MEMBERSHIP_PAYLOAD
                )
            elif parsed.kind is Kind.REGISTRAR and msg.payload:
                self.registrar = messages.decode(RegistrarStatus, msg.payload)

    def state_of(self, node: str) -> str | None:
        rec = self.members.get(node)
        return rec.state.value if rec else None

    def complete(self) -> bool:
        """The per-member records it holds are exactly the snapshot's members, each at least that new."""
        with self._lock:
            if self.snapshot is None:
                return False
            want = {r.node_id: r.revision for r in self.snapshot.members}
            have = {n: r.revision for n, r in self.members.items()}
            return set(want) == set(have) and all(have[n] >= r for n, r in want.items())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Node:
    """A simulated node: registers, publishes status (with a will) and heartbeats like an agent would."""

    def __init__(
        self, broker, node_id: str, *, password: str | None = None, key_n: int | None = None
    ) -> None:
        self.broker = broker
        self.node_id = node_id
        self.password = password if password is not None else USERS.get(node_id)
        self.key = key(key_n if key_n is not None else int(node_id.lstrip("n") or 0) + 1)
        self.replies: queue.Queue[RegisterReply] = queue.Queue()
        self.client: mqtt.Client | None = None
        self.epoch = 0
        self._hb_stop = threading.Event()
        self._hb: threading.Thread | None = None
        self._seq = 0

    def topic(self, kind: Kind) -> str:
        return topics.build(MESH, kind, self.node_id)

    def connect(self, epoch: int) -> Node:
        self.epoch = epoch
        subscribed = threading.Event()
        client = make_client(settings_for(self.broker, self.node_id, self.password), client_id=self.node_id)
        will = NodeStatus(node_id=self.node_id, state="offline", epoch=epoch, at=time.time(), last_will=True)
        client.will_set(self.topic(Kind.STATUS), messages.encode(will), qos=1, retain=True)
        client.on_message = lambda c, u, m: self.replies.put(messages.decode(RegisterReply, m.payload))
        client.on_connect = lambda c, *a: c.subscribe(self.topic(Kind.REPLY), qos=1)
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect(self.broker.host, self.broker.port, keepalive=2)
        client.loop_start()
        assert subscribed.wait(10), f"{self.node_id} not subscribed"
        self.client = client
        return self

    def register(self, *, body: dict | None = None, raw: bytes | None = None, timeout=10):
        request_id = f"rq-{self.node_id}-{time.monotonic_ns()}"
        data = {
            "v": 1,
            "request_id": request_id,
            "node_id": self.node_id,
            "name": f"Node {self.node_id}",
            "public_key": self.key,
            "endpoints": [{"host": "192.0.2.7", "port": 51820}],
            "listen_port": 51820,
            "epoch": self.epoch,
        }
        data.update(body or {})
        assert self.client is not None
        self.client.publish(self.topic(Kind.REGISTER), raw if raw is not None else json.dumps(data), qos=1)
        if raw is not None and b"request_id" not in raw:
            return None
        deadline = time.monotonic() + timeout
        while True:
            reply = self.replies.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply.request_id == data["request_id"] or raw is not None:
                return reply

    def status(self, state: str, *, epoch: int | None = None) -> None:
        msg = NodeStatus(
            node_id=self.node_id, state=state, epoch=self.epoch if epoch is None else epoch, at=time.time()
        )
        self.client.publish(
            self.topic(Kind.STATUS), messages.encode(msg), qos=1, retain=True
        ).wait_for_publish(5)

    def start_heartbeats(self) -> Node:
        self._hb_stop.clear()

        def beat() -> None:
            while not self._hb_stop.wait(HB_S):
                self._seq += 1
                hb = Heartbeat(node_id=self.node_id, epoch=self.epoch, seq=self._seq, sent_at=time.time())
                self.client.publish(self.topic(Kind.HEARTBEAT), messages.encode(hb), qos=0)

        self._hb = threading.Thread(target=beat, daemon=True)
        self._hb.start()
        return self

    def stop_heartbeats(self) -> None:
        self._hb_stop.set()
        if self._hb is not None:
            self._hb.join()

    def enroll(self, svc: RegistrarService, *, token: str = TOKEN):
        """Enrollment (HTTPS in production) through the service: the reply."""
        request = EnrollRequest(
            node_id=self.node_id, name=f"Node {self.node_id}", public_key=self.key, listen_port=51820,
            token=token, password=self.password,
        )  # fmt: skip
        return svc.enroll(request).enroll_reply

    def join(self, svc: RegistrarService, epoch: int = 1, **kw) -> RegisterReply:
        """enroll + connect + register + online + heartbeats."""
        assert self.enroll(svc).ok
        self.connect(epoch)
        reply = self.register(**kw)
        assert reply.ok, reply
        self.status("online")
        self.start_heartbeats()
        return reply

    def crash(self) -> None:
        """Abrupt: the socket closes without DISCONNECT, so the broker publishes the will."""
        self.stop_heartbeats()
        sock = self.client.socket()
        # shutdown first: the broker sees the connection die now, and paho's loop wakes from its select
        sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()
        sock.close()

    def freeze(self) -> None:
        """Frozen process: the network loop stops, the socket stays open, nothing more is sent."""
        self.stop_heartbeats()
        self.client.loop_stop()

    def thaw(self) -> None:
        """The frozen process runs again: the same client's network loop restarts."""
        # paho 2.2's loop_start() makes a new wake-up socket pair without closing the one the last loop_start()
        # made (it only closes them when the client is collected): close it first, or it leaks.
        # https://github.com/eclipse-paho/paho.mqtt.python/issues/627
        self.client._reset_sockets(sockpair_only=True)
        self.client.loop_start()

    def close(self) -> None:
        self.stop_heartbeats()
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


SIGNER = Signer.generate()


def mesh_config(expiry_s: float = 60.0) -> engine.Config:
    return engine.Config(
        mesh=MeshSettings(
            mesh=MESH,
            network=NETWORK,
            heartbeat_interval_s=HB_S,
            heartbeat_ttl_s=TTL_S,
            persistent_keepalive_s=0,
            mtu=1420,
        ),
        policy=LivenessPolicy(ttl_s=TTL_S, expiry_s=expiry_s, grace_s=GRACE_S),
    )


@pytest.fixture
def mesh(any_broker, tmp_path):
    """(broker, start_registrar, cleanup list). The token TOKEN is stored, reusable."""
    broker = any_broker(users=dict(USERS), mesh=MESH)
    db = tmp_path / "registrar.db"
    seed = SqliteStore(db)
    table, tok = tokens.create(tokens.EMPTY, secret=TOKEN, now=time.time(), reusable=True)
    seed.add_token(tok)
    seed.close()
    started: list[RegistrarService] = []
    closers: list[Callable[[], None]] = []

    def start_registrar(expiry_s: float = 60.0, *, publish_window_s: float = 0.05, **kw) -> RegistrarService:
        svc = RegistrarService(
            config=mesh_config(expiry_s),
            store=SqliteStore(db),
            broker=settings_for(broker, "registrar", USERS["registrar"], keepalive=5),
            network=NETWORK,
            quarantine_s=30,
            signer=SIGNER,
            publish_window_s=publish_window_s,
            **kw,
        )
        svc.start()
        assert svc.wait_ready(10), "registrar not ready"
        started.append(svc)
        return svc

    try:
        yield broker, start_registrar, closers
    finally:
        for close in reversed(closers):
            close()
        for svc in started:
            svc.stop()


def nodes(broker, closers, *ids: str) -> list[Node]:
    out = [Node(broker, i) for i in ids]
    closers.extend(n.close for n in out)
    return out


def observer(broker, closers) -> Observer:
    obs = Observer(broker)
    closers.append(obs.close)
    return obs


def membership(svc: RegistrarService) -> tuple[dict, int]:
    """What membership means, without the liveness bookkeeping a member's own heartbeats move (last_seen):
    every member's published record (key, IP, state, revision, ...) and epoch, and the membership revision."""
    ms = svc.state.membership
    return {n: (m.record(), m.epoch) for n, m in ms.members.items()}, ms.revision


def liveness_checked_after(svc: RegistrarService, at: float) -> Callable[[], bool]:
    """A condition: the registrar has judged liveness at or after wall-clock time `at`."""
    return lambda: svc.metrics().get("liveness_checked_at", 0.0) >= at


def test_registration_errors_rotation_and_idempotency(mesh):
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    n1, n2, n3 = nodes(broker, closers, "n1", "n2", "n3")
    first = n1.join(svc)
    assert first.mesh_ip == "10.44.0.1" and first.prefix_len == 24 and first.settings.heartbeat_ttl_s == TTL_S
    # idempotent: same key, new epoch -> same IP, still one member
    n1.epoch = 2
    again = n1.register()
    assert again.ok and again.mesh_ip == first.mesh_ip
    assert len(svc.state.membership.members) == 1
    # n2 has a broker account but never enrolled: its registration is refused, whatever it says
    n2.connect(1)
    assert n2.register().error.code is ErrorCode.NOT_ENROLLED
    assert n2.enroll(svc).ok
    cases = [
        ({"public_key": n1.key}, ErrorCode.REKEY_OVER_HTTPS),  # another key (n1's!) through the broker
        ({"public_key": "bm90IGEga2V5"}, ErrorCode.INVALID_KEY),
        ({"node_id": "n3"}, ErrorCode.INVALID_REQUEST),  # payload id differs from topic id
        ({"listen_port": 70000}, ErrorCode.INVALID_REQUEST),
        ({"join_token": TOKEN}, ErrorCode.INVALID_REQUEST),  # no secrets on MQTT: not a field any more
    ]
    for body, code in cases:
        reply = n2.register(body=body)
        assert not reply.ok and reply.error.code is code, (body, reply)
    # n1 registers with a new key: refused through the broker, a rotation (same IP) over HTTPS
    n1.key, n1.epoch = key(77), 3
    assert n1.register().error.code is ErrorCode.REKEY_OVER_HTTPS
    assert svc.state.membership.members["n1"].public_key == key(1 + 1)
    body = {"v": 1, "request_id": "rq-https-rotation", "node_id": "n1", "name": "Node n1", "public_key": key(77),
            "endpoints": [], "listen_port": 51820, "epoch": 3}  # fmt: skip
    rotated = svc.register_payload(json.dumps(body).encode(), node_id="n1").reply
    assert rotated.ok and rotated.mesh_ip == first.mesh_ip
    assert svc.state.membership.members["n1"].public_key == key(77)
    # a stale epoch (replayed request of an old session)
    n1.epoch = 1
    assert n1.register().error.code is ErrorCode.INVALID_REQUEST
    # expired and used tokens, at enrollment
    now = time.time()
    store = SqliteStore(broker.workdir.parent / "registrar.db")
    _, expired = tokens.create(tokens.EMPTY, secret="mvj_expired-000000000000", now=now - 100, ttl_s=1)
    _, single = tokens.create(tokens.EMPTY, secret="mvj_single-0000000000000", now=now)
    store.add_token(expired)
    store.add_token(single)
    store.close()
    assert n3.enroll(svc, token="mvj_expired-000000000000").error.code is ErrorCode.TOKEN_EXPIRED
    assert n3.enroll(svc, token="mvj_single-0000000000000").ok
    n4 = nodes(broker, closers, "n4")[0]
    assert n4.enroll(svc, token="mvj_single-0000000000000").error.code is ErrorCode.TOKEN_USED
    assert sorted(svc.state.membership.members) == ["n1", "n2", "n3"]


def test_late_subscriber_sees_retained_membership(mesh):
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    early = observer(broker, closers)
    joined = nodes(broker, closers, "n1", "n2", "n3")
    ips = {n.node_id: n.join(svc).mesh_ip for n in joined}
    wait_for(lambda: svc.state.membership.revision >= 3, what="3 registrations")
    # Late means after the batched publish went out: a subscriber from the start has seen all of it.
    wait_for(
        lambda: early.complete() and early.snapshot.revision == svc.state.membership.revision, what="published"
    )
    obs = observer(broker, closers)
    wait_for(obs.complete, what="a complete retained view")
    assert {n: r.mesh_ip for n, r in obs.members.items()} == ips
    assert obs.registrar.state == "online" and obs.registrar.instance == svc.instance
    assert all(r.state.value == "active" for r in obs.members.values())


def test_a_lone_change_is_published_without_waiting_for_the_window(mesh):
    """The publish schedule's wiring: with a 30 s window, a single registration after a quiet period still
    reaches observers at once. The rules themselves (debounce, cap, will hold) are table-driven unit tests of
    registrar.publishing (tests/unit/test_registrar_publishing.py), which need no clock."""
    broker, start_registrar, closers = mesh
    svc = start_registrar(publish_window_s=30.0, publish_max_delay_s=30.0)
    obs = observer(broker, closers)
    wait_for(lambda: obs.snapshot is not None, what="initial snapshot")
    (n1,) = nodes(broker, closers, "n1")
    n1.join(svc)
    wait_for(lambda: obs.state_of("n1") == "active", timeout=10, what="n1 published long before the window")


def test_crash_detected_by_will_then_expiry(mesh):
    broker, start_registrar, closers = mesh
    svc = start_registrar(expiry_s=2.0)
    obs = observer(broker, closers)
    n1, n2 = nodes(broker, closers, "n1", "n2")
    n1.join(svc)
    n2.join(svc)
    wait_for(lambda: obs.state_of("n1") == "active" and obs.state_of("n2") == "active", what="both active")
    t0 = time.monotonic()
    n1.crash()
    wait_for(lambda: svc.state.membership.members["n1"].state.value == "unreachable", what="n1 unreachable")
    member = svc.state.membership.members["n1"]
    assert member.unreachable_since - member.last_seen < TTL_S  # by the will, before silence could tell
    wait_for(lambda: obs.state_of("n1") == "unreachable", what="observer sees n1 unreachable")
    detected = time.monotonic() - t0
    assert obs.state_of("n2") == "active"
    # expiry: tombstone, a snapshot without it, complete view
    wait_for(lambda: "n1" not in obs.members and obs.complete(), timeout=10, what="n1 removed")
    assert [r.node_id for r in obs.snapshot.members] == ["n2"]
    assert detected < 5


def test_frozen_client_detected_by_missed_heartbeats_and_revives(mesh):
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    obs = observer(broker, closers)
    (n1,) = nodes(broker, closers, "n1")
    n1.join(svc)
    wait_for(lambda: obs.state_of("n1") == "active", what="n1 active")
    n1.freeze()
    wait_for(lambda: obs.state_of("n1") == "unreachable", what="n1 unreachable after TTL")
    member = svc.state.membership.members["n1"]
    # by silence, not by a will: declared only after a full TTL without hearing from it
    assert member.unreachable_since - member.last_seen > TTL_S
    # the process thaws: heartbeats of the same epoch revive it (the broker may have cut the connection meanwhile)
    n1.thaw()
    n1.start_heartbeats()
    wait_for(lambda: obs.state_of("n1") == "active", what="n1 active again")
    assert svc.state.membership.members["n1"].mesh_ip == "10.44.0.1"


def test_graceful_offline(mesh):
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    obs = observer(broker, closers)
    (n1,) = nodes(broker, closers, "n1")
    n1.join(svc)
    wait_for(lambda: obs.state_of("n1") == "active", what="n1 active")
    n1.stop_heartbeats()
    n1.status("offline")
    n1.close()
    wait_for(
        lambda: obs.state_of("n1") == "unreachable", timeout=TTL_S * 0.9, what="offline well before the TTL"
    )


def test_stale_epoch_will_ignored_after_reregistration(mesh):
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    obs = observer(broker, closers)
    (n1,) = nodes(broker, closers, "n1")
    n1.join(svc, epoch=1)
    wait_for(lambda: obs.state_of("n1") == "active", what="n1 active")
    # the node restarts: a new connection (taking over the client id) with a new epoch and will
    n1.stop_heartbeats()
    old = n1.client
    n1.connect(2)
    old.loop_stop()  # before paho's reconnect (>= 1 s) could take the client id back
    assert n1.register().ok
    n1.status("online")
    n1.start_heartbeats()
    # A broker may publish the old connection's will at takeover (epoch 1, still current then): that is
    # a transient unreachable, healed by the registration; what matters is what follows.
    wait_for(
        lambda: svc.state.membership.members["n1"].epoch == 2 and obs.state_of("n1") == "active",
        what="new session active",
    )
    # a late will or status of the old session must not take the new session down
    rev = svc.state.membership.revision
    ignored = svc.counters["ignored"]
    sent_at = time.time()
    n1.status("offline", epoch=1)
    n1.status("online")
    wait_for(lambda: svc.counters["ignored"] > ignored, what="the stale offline status read and ignored")
    # and nothing else takes it down: liveness judged a full TTL later (the heartbeats of epoch 2 count)
    wait_for(liveness_checked_after(svc, sent_at + TTL_S), timeout=TTL_S + 10, what="a liveness check a TTL later")
    assert svc.state.membership.members["n1"].state.value == "active"
    assert svc.state.membership.members["n1"].epoch == 2
    assert obs.state_of("n1") == "active"
    assert svc.state.membership.revision == rev


def test_malformed_input_changes_nothing(mesh):
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    n1, n2 = nodes(broker, closers, "n1", "n2")
    n1.join(svc)
    n2.connect(1)
    wait_for(lambda: "n1" in svc.state.membership.members and svc.state.membership.members["n1"].epoch == 1,
             what="n1 registered")  # fmt: skip
    before = membership(svc)
    rejected = svc.counters["rejected"]
    junk = [
        b"",
        b"\x00\xff",
        b"[]",
        b"{",
        b"null",
        b'{"v":2}',
        json.dumps({"v": 1, "x": "y" * 20000}).encode(),
    ]
    for payload in junk:
        for kind in (Kind.REGISTER, Kind.STATUS, Kind.HEARTBEAT):
            n2.client.publish(n2.topic(kind), payload, qos=1).wait_for_publish(5)
    # heartbeats and status for a node that is not a member, and a register with a usable request id
    n2.client.publish(
        n2.topic(Kind.HEARTBEAT), messages.encode(Heartbeat(node_id="n2", epoch=1, seq=1, sent_at=1))
    )
    bad = n2.register(raw=json.dumps({"request_id": "bad-request-1", "node_id": "n2", "epoch": -1}).encode())
    assert (
        bad is not None and bad.request_id == "bad-request-1" and bad.error.code is ErrorCode.INVALID_REQUEST
    )
    wait_for(lambda: svc.counters["rejected"] >= rejected + 10, what="rejections counted")
    assert membership(svc) == before
    # still alive and serving
    assert n2.enroll(svc).ok and n2.register().ok


def test_registrar_restart_keeps_members_and_ips(mesh):
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    obs = observer(broker, closers)
    joined = nodes(broker, closers, "n1", "n2", "n3")
    ips = {n.node_id: n.join(svc).mesh_ip for n in joined}
    wait_for(lambda: all(obs.state_of(n) == "active" for n in ips), what="all active")
    svc.stop()
    wait_for(lambda: obs.registrar.state == "offline", what="graceful registrar offline")
    history_len = len(obs.history)
    svc2 = start_registrar()
    assert {n: m.mesh_ip for n, m in svc2.state.membership.members.items()} == ips
    wait_for(
        lambda: obs.registrar.state == "online" and obs.registrar.instance == svc2.instance, what="online"
    )
    # The window for false removals: the grace period, then a full TTL in which liveness is judged.
    grace_ends = svc2.state.membership.started_at + GRACE_S
    wait_for(
        liveness_checked_after(svc2, grace_ends + TTL_S), timeout=GRACE_S + TTL_S + 10, what="grace + TTL judged"
    )
    assert all(state == "active" for _, state in obs.history[history_len:]), obs.history[history_len:]
    assert all(m.state.value == "active" for m in svc2.state.membership.members.values())
    again = joined[0]
    again.epoch = 2
    assert again.register().mesh_ip == ips["n1"]


def test_a_registration_sent_the_moment_the_registrar_says_online_is_answered(mesh, monkeypatch):
    """Agents register as soon as they read the registrar's live online status; a request published before the
    registrar subscribed reaches nobody (found by the chaos bench: an agent then waited out its timeout and a
    long backoff). Here the registrar's subscribe is slowed down, and the node sends once, with no retry."""
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    n1 = nodes(broker, closers, "n1")[0]
    n1.join(svc)
    svc.stop()

    import registrar.broker_link as broker_link

    def slow_subscriber(*args, **kwargs):
        client = make_client(*args, **kwargs)
        subscribe = client.subscribe

        def slowly(*a, **kw):
            time.sleep(0.5)  # a loaded registrar between its publishes and its SUBSCRIBE: not a wait for a result
            return subscribe(*a, **kw)

        client.subscribe = slowly
        return client

    monkeypatch.setattr(broker_link, "make_client", slow_subscriber)
    n1.epoch, sent = 2, threading.Event()
    status_topic = topics.build(MESH, Kind.REGISTRAR)

    def on_message(client, userdata, msg) -> None:
        if msg.topic != status_topic:
            n1.replies.put(messages.decode(RegisterReply, msg.payload))
        elif not msg.retain and messages.decode(RegistrarStatus, msg.payload).state == "online" and not sent.is_set():
            sent.set()  # like an agent: one request at once (the reply must come without a retry)
            client.publish(n1.topic(Kind.REGISTER), json.dumps({
                "v": 1, "request_id": "rq-at-online", "node_id": "n1", "name": "Node n1", "public_key": n1.key,
                "endpoints": [{"host": "192.0.2.7", "port": 51820}], "listen_port": 51820, "epoch": 2}), qos=1)

    n1.client.on_message = on_message
    n1.client.subscribe(status_topic, qos=1)
    start_registrar()
    assert sent.wait(10), "the registrar never said it is online"
    reply = n1.replies.get(timeout=5)
    assert reply.request_id == "rq-at-online" and reply.ok, reply


def test_registrar_kill_9_and_restart(mesh, tmp_path):
    broker, _, closers = mesh
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os.rename(tmp_path / "registrar.db", state_dir / "registrar.db")
    env = {
        **os.environ,
        "MESHVPN_BROKER__URL": broker.url,
        "MESHVPN_BROKER__USERNAME": "registrar",
        "MESHVPN_BROKER__PASSWORD": USERS["registrar"],
        "MESHVPN_BROKER_ACCOUNTS": "none",  # the nodes' accounts are the test's
        "MESHVPN_GRACE_S": str(GRACE_S),
        "MESHVPN_BROKER__KEEPALIVE_S": "2",  # the broker publishes our will 3 s after the kill
    }
    http = f"https://127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "registrar", "run", "--state-dir", str(state_dir), "--mesh", MESH,
            "--network", NETWORK, "--heartbeat-interval", str(HB_S), "--heartbeat-ttl", str(TTL_S),
            "--http", http.removeprefix("https://")]  # fmt: skip
    log_path = tmp_path / "registrar.log"

    def launch() -> subprocess.Popen:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        closers.append(lambda: (proc.kill(), proc.wait()))

        def ready() -> bool:
            assert proc.poll() is None, "registrar exited:\n" + log_path.read_text()
            if not (state_dir / "ca.pem").exists():
                return False
            try:
                return httpx.get(f"{http}/healthz", timeout=1, verify=trust()).json()["ready"]
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=20, what="registrar ready (/healthz)")
        return proc

    def trust():
        context = ssl.create_default_context(cafile=str(state_dir / "ca.pem"))
        context.check_hostname = False
        return context

    def liveness_checked_at() -> float:
        admin = {"Authorization": f"Bearer {(state_dir / 'admin_token').read_text().strip()}"}
        for line in httpx.get(f"{http}/metrics", timeout=5, verify=trust(), headers=admin).text.splitlines():
            if line.startswith("meshvpn_registrar_liveness_checked_timestamp_seconds "):
                return float(line.split()[1])
        return 0.0

    proc = launch()
    obs = observer(broker, closers)
    joined = nodes(broker, closers, "n1", "n2")
    for n in joined:
        enrolled = httpx.post(f"{http}/v1/enroll", verify=trust(), timeout=10, content=EnrollRequest(
            node_id=n.node_id, name=n.node_id, public_key=n.key, listen_port=51820, token=TOKEN, password=n.password,
        ).model_dump_json())  # fmt: skip
        assert enrolled.status_code == 200, enrolled.text
    ips = {}
    for n in joined:
        n.connect(1)
        reply = n.register()
        assert reply.ok, reply
        n.status("online")
        n.start_heartbeats()
        ips[n.node_id] = reply.mesh_ip
    wait_for(lambda: all(obs.state_of(n) == "active" for n in ips), what="all active")
    first_instance = obs.registrar.instance
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the broker notices the dead connection (keepalive) and publishes the registrar's will
    wait_for(lambda: obs.registrar.state == "offline", timeout=30, what="registrar will")
    history_len = len(obs.history)
    proc = launch()
    wait_for(
        lambda: obs.registrar.state == "online" and obs.registrar.instance != first_instance, what="online"
    )
    wait_for(obs.complete, what="complete view after restart")
    assert {n: r.mesh_ip for n, r in obs.members.items()} == ips
    # The window for false removals: the grace period from its (re)connection, then a full TTL judged.
    judged_until = obs.registrar.at + GRACE_S + TTL_S
    wait_for(lambda: liveness_checked_at() >= judged_until, timeout=GRACE_S + TTL_S + 10, what="grace + TTL")
    assert all(state == "active" for _, state in obs.history[history_len:]), obs.history[history_len:]
    # SIGTERM: a graceful stop publishes offline itself (same instance, not the broker's will) and exits 0
    instance = obs.registrar.instance
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    wait_for(lambda: obs.registrar.state == "offline", what="graceful offline")
    assert obs.registrar.instance == instance
    # the will carries the start time; the graceful status is stamped at the stop (it ran for > 2 s)
    assert obs.registrar.at - obs.registrar.started_at > 2.0


def test_broker_restart_republishes_state(mesh):
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    joined = nodes(broker, closers, "n1", "n2")
    ips = {n.node_id: n.join(svc).mesh_ip for n in joined}
    wait_for(lambda: svc.state.membership.revision >= 2, what="registered")
    broker.stop()
    wait_for(lambda: not svc.connected, what="registrar notices the broker is gone")
    broker.start()  # no persistence: every retained message is gone
    wait_for(lambda: svc.connected, timeout=40, what="registrar reconnected")
    obs = observer(broker, closers)
    wait_for(obs.complete, what="retained state republished")
    assert {n: r.mesh_ip for n, r in obs.members.items()} == ips
    assert obs.registrar.state == "online"
    # paho reconnects the nodes too; their heartbeats keep them (or make them again) active
    wait_for(lambda: all(obs.state_of(n) == "active" for n in ips), timeout=40, what="members active")


def test_offline_statuses_just_before_the_broker_went_away_are_forgiven(mesh):
    """A stopping broker publishes every client's will just before it drops the registrar (Mosquitto does, in
    no fixed order). Modelled deterministically: three wills, then the broker dies at once. On reconnection the
    registrar must not publish those members unreachable; nodes that really are gone are then caught by the TTL."""
    broker, start_registrar, closers = mesh
    # A wider window than the default 2 s: on a loaded machine the three crashes below take a while.
    svc = start_registrar(offline_doubt_s=10.0)
    joined = nodes(broker, closers, "n1", "n2", "n3")
    for n in joined:
        n.join(svc)
    ids = [n.node_id for n in joined]

    def states() -> set[str]:
        members = svc.state.membership.members
        return {members[i].state.value for i in ids}

    wait_for(lambda: states() == {"active"}, what="all active")
    for n in joined:
        n.crash()
    wait_for(lambda: states() == {"unreachable"}, timeout=5, what="the wills arrived")
    broker.stop()
    wait_for(lambda: not svc.connected, what="registrar notices the broker is gone")
    broker.start()
    wait_for(lambda: svc.connected, timeout=40, what="registrar reconnected")
    wait_for(lambda: states() == {"active"}, timeout=2, what="members forgiven on reconnection")
    obs = observer(broker, closers)
    wait_for(obs.complete, what="retained state republished")
    assert {obs.state_of(i) for i in ids} == {"active"}
    # Nobody heartbeats: after the grace period the TTL says they are gone, as it should.
    wait_for(lambda: states() == {"unreachable"}, timeout=GRACE_S + TTL_S + 5, what="unreachable by TTL")


def test_stale_retained_record_is_tombstoned(mesh):
    broker, start_registrar, closers = mesh
    # a record left behind (e.g. a node removed while the broker was down): only the registrar may publish it
    leftover = MemberRecord(
        node_id="ghost", name="ghost", mesh_ip="10.44.0.99", public_key=key(99), listen_port=1, state=MemberState.ACTIVE,
        revision=1, updated_at=1.0,
    )  # fmt: skip
    pub = make_client(settings_for(broker, "registrar", USERS["registrar"]), client_id="registrar")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    pub.publish(
        topics.build(MESH, Kind.MEMBERS, "ghost"), messages.encode(leftover), qos=1, retain=True
    ).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    start_registrar()
    obs = observer(broker, closers)
    wait_for(
        lambda: obs.snapshot is not None and obs.complete() and "ghost" not in obs.members, what="ghost gone"
    )


def test_a_flooding_node_does_not_starve_the_others(mesh):
    """A member with valid credentials sends heartbeats as fast as it can; the others still join and stay, the
    flood is dropped before the single writer (counted), and the flooder itself stays a member."""
    broker, start_registrar, closers = mesh
    svc = start_registrar()
    flooder, *others = nodes(broker, closers, "n1", "n2", "n3", "n4")
    flooder.join(svc)
    stop = threading.Event()

    def flood() -> None:
        seq = 0
        while not stop.is_set():
            for _ in range(200):
                seq += 1
                hb = Heartbeat(node_id="n1", epoch=flooder.epoch, seq=seq, sent_at=time.time())
                flooder.client.publish(flooder.topic(Kind.HEARTBEAT), messages.encode(hb), qos=0)
            time.sleep(0.001)  # yield to paho's network thread so the queue drains to the broker

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    closers.append(lambda: (stop.set(), thread.join()))
    wait_for(lambda: svc.counters["flood_dropped"] >= 2000, timeout=30, what="the flood reaching the registrar")
    for node in others:
        assert node.join(svc).ok
    wait_for(lambda: all(svc.state.membership.members[n].state is MemberState.ACTIVE for n in ("n2", "n3", "n4")),
             what="the others online during the flood")  # fmt: skip
    assert svc.state.membership.members["n1"].state is MemberState.ACTIVE
    assert svc.metrics()["counter_flood_dropped"] >= 2000
