"""The control-plane session's lifecycle: one MQTT connection at a time, its status, heartbeats and the goodbye.

Threads and who owns what:
  - the session thread (`_run`) owns the connection: it creates one paho client per connection (each with a
    new epoch and a last-will carrying it), has it registered (nodeagent.registration), publishes status and
    reconnects with backoff and jitter. It never touches WireGuard.
  - paho's network thread runs the callbacks: what arrives is checked and handed on by nodeagent.inbound
    (membership to the shared MeshState, replies to the registration exchange), which reports a new membership
    through this session's typed events. It never blocks.
  - heartbeats are sent by whoever calls `heartbeat()` (the agent's scheduler); endpoint updates and key
    rotation run on the caller's thread too, through the registration exchange.

What to do next (epochs, backoff, credentials, which refusals are final) is decided by the pure
nodeagent.policy; this module only connects those decisions to paho.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from meshcontract import messages, topics
from meshcontract.messages import Endpoint, Heartbeat, NodeStatus, PathReport
from meshcontract.signing import Verifier
from meshcontract.topics import Kind
from meshcontract.transport import make_client, release
from nodeagent import policy
from nodeagent.connection import ClientFactory, Connection
from nodeagent.credentials import BrokerLogin
from nodeagent.enrollment import TransientError
from nodeagent.errors import RegistrationRefused
from nodeagent.identity import Identity
from nodeagent.inbound import Inbound
from nodeagent.meshstate import MeshState
from nodeagent.registrar_client import RegistrarClient
from nodeagent.registration import RegistrationExchange, ReplyBox
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Registration, StateStore
from nodeagent.underlay import EndpointSource, FixedEndpoints

log = logging.getLogger(__name__)

# CONNACK reason codes (MQTT 3.1.1 return codes 4 and 5 as paho maps them) meaning "not these credentials".
_AUTH_REFUSED = (0x86, 0x87)
_STOP_PUBLISH_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Registered:
    """The registrar accepted a registration on the current connection."""

    registration: Registration
    epoch: int


@dataclass(frozen=True, slots=True)
class MembershipChanged:
    """A new complete membership exists (reconcile should run)."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The registrar refused us for good; the agent should stop."""

    error: RegistrationRefused


SessionEvent = Registered | MembershipChanged | Refused


class ControlSession:
    """The agent's link to the control plane. `start()`, `heartbeat()` periodically, `stop()`.

    It owns the connection and this node's identity; the registration exchange (nodeagent.registration) and the
    inbound messages (nodeagent.inbound) act on the connection it hands them.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        identity: Identity,
        store: StateStore,
        login: BrokerLogin,
        mesh: MeshState,
        verifier: Verifier,
        registration: Registration | None,
        on_event: Callable[[SessionEvent], None],
        clock: Callable[[], float] = time.time,
        client_factory: ClientFactory = make_client,
        registrar: RegistrarClient | None = None,
        endpoints: EndpointSource | None = None,
    ) -> None:
        self._settings = settings
        self._registrar = registrar
        self._me = identity
        self._store = store
        self._login = login
        self._on_event = on_event
        self._clock = clock
        self._client_factory = client_factory
        self._replies = ReplyBox()
        self._endpoints = endpoints or FixedEndpoints([identity.endpoint] if identity.endpoint else [])
        self._exchange = RegistrationExchange(
            settings,
            identity=lambda: self._me,
            store=store,
            endpoints=self._endpoints,
            registrar=registrar,
            replies=self._replies,
            fields=self._fields,
        )
        self._inbound = Inbound(
            mesh_name=settings.mesh,
            state=mesh,
            verifier=verifier,
            replies=self._replies,
            on_membership_changed=lambda: self._on_event(MembershipChanged()),
            fields=self._fields,
        )
        self._lock = threading.Lock()  # guards everything below
        self._registration = registration
        self._conn: Connection | None = None
        self._heartbeat_seq = 0
        self._stopping = threading.Event()
        self._refused = False
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()  # set after each successful registration, cleared on disconnect
        self.identity_checks = 0  # times the broker refused our credential and we asked the registrar about it

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"agent-session-{self._me.node_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Say goodbye on the broker (status offline, clean DISCONNECT) unless refused; end the thread."""
        self._stopping.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.lost.set()  # wakes the session thread, which says goodbye on the broker
        # ...also while it waits for a registration reply. After marking the connection lost: woken before, the
        # wait could look at the connection, find it still up and sleep out its timeout.
        self._replies.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- state for callers ------------------------------------------------------------------------------
    @property
    def registration(self) -> Registration | None:
        with self._lock:
            return self._registration

    @property
    def connected(self) -> bool:
        with self._lock:
            conn = self._conn
        return conn is not None and conn.connected.is_set() and not conn.lost.is_set()

    @property
    def registrar_online(self) -> bool:
        return self._replies.online

    def _fields(self, **more: object) -> dict[str, object]:
        return {**self._me.log_fields(self.registration.mesh_ip if self.registration else None), **more}

    def _topic(self, kind: Kind, node: str | None = None) -> str:
        return topics.build(self._settings.mesh, kind, node)

    # -- heartbeats -------------------------------------------------------------------------------------
    def heartbeat(self, *, alive: list[str] | None = None, paths: PathReport | None = None) -> None:
        """Publish one heartbeat on the current connection (nothing while disconnected), with the members we
        vouch for (`alive`) and a path report if given (nodeagent.presence)."""
        with self._lock:
            conn = self._conn
            seq = self._heartbeat_seq
            self._heartbeat_seq += 1
        if conn is None or conn.lost.is_set():
            return
        beat = Heartbeat(
            node_id=self._me.node_id, epoch=conn.epoch, seq=seq, sent_at=self._clock(), alive=alive or [], paths=paths
        )
        conn.client.publish(self._topic(Kind.HEARTBEAT, self._me.node_id), messages.encode(beat), qos=0)

    # -- the session loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        """The daemon loop of the control-plane session: one connection per iteration, until stopped."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                # The endpoints are made ready while connecting only at start and after a connection that
                # registered: during a broker outage each attempt would otherwise ask the registrar as well.
                registered = self._one_connection(prepare_endpoints=attempt == 0)
            except Exception:  # the daemon loop: log, keep the tunnels, try again after a backoff
                log.exception("session failed; retrying", extra=self._fields())
                registered = None
            if self._stopping.is_set():
                return
            if self._identity_gone():
                return
            attempt = 0 if registered else attempt + 1
            registration = self.registration
            cap = policy.reconnect_cap(registration.settings.heartbeat_ttl_s if registration else None)
            delay = policy.backoff_delay(attempt, cap=cap)
            log.info("reconnecting to the broker in %.1fs", delay, extra=self._fields())
            self._stopping.wait(delay)

    def _identity_gone(self) -> bool:
        """After the broker refused our credential: ask the registrar (HTTPS) whether it still knows us. If not
        (removed by an admin, expired after the reservation), stop for good; a broker problem is retried."""
        with self._lock:
            conn = self._conn
        if conn is None or not conn.auth_refused or self._registrar is None:
            return False
        self.identity_checks += 1
        try:
            if self._registrar.identity_valid():
                log.warning("the broker refused our credential but the registrar knows it: a broker problem, retrying",
                            extra=self._fields())  # fmt: skip
                return False
        except TransientError as exc:
            log.warning("the broker refused our credential and the registrar cannot be asked (%s); retrying", exc,
                        extra=self._fields())  # fmt: skip
            return False
        error = RegistrationRefused(
            policy.IDENTITY_GONE,
            "the registrar no longer knows this node (removed by an admin, or away longer than its reservation): "
            "enroll it again with a new join token",
        )
        log.error("%s", error, extra=self._fields())
        self._refused = True
        self._stopping.set()
        self._on_event(Refused(error))
        return True

    def _new_connection(self) -> Connection:
        epoch = policy.next_epoch(self._store.epoch(), now_ms=int(self._clock() * 1000))
        self._store.save_epoch(epoch)
        client = self._client_factory(self._login.next_settings(), client_id=self._me.node_id)
        # A bug in one of our callbacks must not kill paho's network thread (the session would hang, neither
        # connected nor lost): paho logs the exception and carries on.
        client.enable_logger(logging.getLogger("nodeagent.mqtt"))
        client.suppress_exceptions = True
        conn = Connection(client, epoch, threading.Event(), threading.Event(), threading.Event())
        will = NodeStatus(
            node_id=self._me.node_id, state="offline", epoch=epoch, at=self._clock(), last_will=True
        )
        client.will_set(self._topic(Kind.STATUS, self._me.node_id), messages.encode(will), qos=1, retain=True)
        client.on_connect = lambda c, u, flags, rc, props: self._on_connect(conn, rc)
        client.on_subscribe = lambda c, u, mid, rcs, props: self._on_subscribe(conn, mid, rcs)
        client.on_disconnect = lambda c, u, flags, rc, props: self._on_disconnect(conn)
        client.on_message = lambda c, u, msg: self._on_message(conn, msg)
        return conn

    def _one_connection(self, *, prepare_endpoints: bool = False) -> bool | None:
        """Connect, register and serve until the connection is lost or we stop; with `prepare_endpoints`, the
        endpoint candidates for the registration are refreshed while connecting (EndpointSource.prepare).

        True if this connection registered, False if it did not, None if the broker was unreachable.
        """
        broker = self._login.broker
        host, port, _ = broker.host_port()
        conn = self._new_connection()
        with self._lock:
            self._conn = conn
        # stop() sets _stopping, then marks the connection it sees as lost; checking after publishing the
        # connection under the lock means one of the two always notices the other.
        if self._stopping.is_set():
            return None
        endpoints_ready = self._endpoints.prepare() if prepare_endpoints else None
        try:
            registration = self.registration
            ttl = registration.settings.heartbeat_ttl_s if registration else None
            conn.client.connect(host, port, keepalive=policy.mqtt_keepalive(broker.keepalive_s, ttl))
        except OSError as exc:
            log.warning("broker %s unreachable: %s", broker.url, exc, extra=self._fields())
            return None
        conn.client.loop_start()
        registered = self._serve(conn, endpoints_ready)
        if self._stopping.is_set():
            # Say goodbye even if this connection never got registered: an offline status with a newer epoch
            # ends our membership at once instead of after the TTL. Not when refused.
            self._close(conn, goodbye=not self._refused)
        else:
            release(conn.client)
        return registered

    def _serve(self, conn: Connection, endpoints_ready: Callable[[], list[Endpoint]] | None = None) -> bool:
        """Register on `conn` and stay until it is lost or we stop. True if registration succeeded."""
        # Subscribed before registering: the reply (and membership) must have somewhere to land.
        while not conn.subscribed.wait(0.1):
            if conn.lost.is_set():
                return False
        try:
            registration = self._exchange.register(conn, endpoints_ready=endpoints_ready)
        except RegistrationRefused as exc:
            log.error("%s", exc, extra=self._fields())
            self._refused = True
            self._stopping.set()
            self._on_event(Refused(exc))
            return False
        if registration is None:
            return False
        self._registered(conn, registration)
        conn.lost.wait()
        self.registered.clear()
        if not self._stopping.is_set():
            log.warning("lost the broker connection; keeping every tunnel", extra=self._fields())
        return True

    # -- key rotation (the local API's thread) and endpoint updates (the agent's timer) -----------------------
    def rotate_key(self, identity: Identity) -> bool:
        """Register `identity` (this node with a new key) with the registrar over HTTPS, and make it ours.

        True if the registrar confirmed it. False if it could not be asked (or did not answer): the new key is
        ours anyway, and the current connection is closed cleanly so the next one registers it (a registrar that
        still holds the old key answers rekey_over_https, and the session registers the new one over HTTPS).
        AgentError, changing nothing, if the registrar refused the new key or there is no HTTPS door to it.
        """
        with self._lock:
            conn = self._conn
        on_broker = conn is not None and not conn.lost.is_set() and self.registered.is_set()
        confirmed = self._exchange.register_new_key(identity, on_broker=on_broker)
        self._me = identity
        if not confirmed:
            if conn is not None and not conn.lost.is_set():
                conn.client.disconnect()  # clean: no will; the session reconnects with a new epoch and registers
            return False
        log.info("key rotated: registered public key %s", identity.public_key, extra=self._fields(event="rotated"))
        return True

    def update_endpoints(self) -> bool:
        """Register again on the current connection if the endpoint candidates changed since the registrar last
        confirmed them (an address came or went, the NAT's outside address changed). True if it confirmed the new
        ones; False if nothing changed, we are not registered with an online registrar now (the next
        registration carries them), or it did not confirm (the next call tries again)."""
        with self._lock:
            conn = self._conn
        return self._exchange.update_endpoints(conn, registered=self.registered.is_set())

    def _registered(self, conn: Connection, registration: Registration) -> None:
        with self._lock:
            previous, self._registration = self._registration, registration
        if registration != previous:
            self._store.save_registration(registration)
        log.info(
            "registered as %s/%s",
            registration.mesh_ip,
            registration.prefix_len,
            extra=self._fields(epoch=conn.epoch, event="registered"),
        )
        online = NodeStatus(node_id=self._me.node_id, state="online", epoch=conn.epoch, at=self._clock())
        conn.client.publish(
            self._topic(Kind.STATUS, self._me.node_id), messages.encode(online), qos=1, retain=True
        )
        self._on_event(Registered(registration, conn.epoch))
        self.heartbeat()
        self.registered.set()

    def _close(self, conn: Connection, *, goodbye: bool) -> None:
        if goodbye and conn.connected.is_set():
            offline = NodeStatus(
                node_id=self._me.node_id, state="offline", epoch=conn.epoch, at=self._clock()
            )
            info = conn.client.publish(
                self._topic(Kind.STATUS, self._me.node_id), messages.encode(offline), qos=1, retain=True
            )
            try:
                info.wait_for_publish(timeout=_STOP_PUBLISH_TIMEOUT_S)
            except (RuntimeError, ValueError) as exc:  # paho: not queued / connection gone
                log.warning("could not publish offline status: %s", exc)
            log.info("published status offline", extra=self._fields())
        conn.client.disconnect()  # a clean DISCONNECT: the broker discards our will
        release(conn.client)

    # -- paho callbacks (network thread: never block here) ----------------------------------------------
    def _on_connect(self, conn: Connection, reason_code: mqtt.ReasonCode) -> None:
        if reason_code.is_failure:
            conn.auth_refused = reason_code.value in _AUTH_REFUSED
            hint = (
                "the configured broker.password" if self._login.configured else "this node's own credential"
            ) if reason_code.value in _AUTH_REFUSED else "the broker"
            log.error("broker refused the connection: %s (check %s)", reason_code, hint, extra=self._fields())
            return
        log.info("connected to the broker %s", self._login.broker.url, extra=self._fields())
        conn.connected.set()
        self._replies.forget_registrar()
        self._inbound.subscribe(conn, node_id=self._me.node_id)

    def _on_subscribe(self, conn: Connection, mid: int, reason_codes: list[mqtt.ReasonCode]) -> None:
        if mid != conn.sub_mid:
            return
        refused = [topic for topic, rc in zip(conn.subscriptions, reason_codes, strict=False) if rc.is_failure]
        if refused:
            log.error("broker refused our subscription to %s (access rules?)", ", ".join(refused), extra=self._fields())
        conn.subscribed.set()

    def _on_disconnect(self, conn: Connection) -> None:
        conn.lost.set()
        self._replies.wake()
        # One paho client per connection: stop this one's thread instead of letting paho reconnect it with
        # the old epoch and will. The session thread builds the next connection.
        conn.client.loop_stop()

    def _on_message(self, conn: Connection, msg: mqtt.MQTTMessage) -> None:
        self._inbound.handle(conn, msg)
