"""The control-plane session: one MQTT connection at a time, registration, heartbeats and the goodbye.

Threads and who owns what:
  - the session thread (`_run`) owns the connection: it creates one paho client per connection (each with a
    new epoch and a last-will carrying it), registers, publishes status and reconnects with backoff and
    jitter. It never touches WireGuard.
  - paho's network thread runs the callbacks: it decodes membership messages, checks the registrar's signature
    on each, feeds them to the shared MeshState and reports what happened as typed events. It never blocks.
    While the MeshState is syncing (a new connection, a missed delta) the session holds a subscription to the
    retained snapshot; once in sync it drops it, so a steady agent receives only deltas.
  - heartbeats are sent by whoever calls `heartbeat()` (the agent's scheduler).

What to do next (epochs, backoff, credentials, which refusals are final) is decided by the pure
nodeagent.policy; this module only connects those decisions to paho.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from meshcontract import messages, topics
from meshcontract.errors import ContractError
from meshcontract.messages import (
    Endpoint,
    ErrorCode,
    Heartbeat,
    MembershipDelta,
    MembershipSnapshot,
    NodeStatus,
    PathReport,
    RegisterReply,
    RegisterRequest,
    RegistrarStatus,
)
from meshcontract.signing import Verifier
from meshcontract.topics import Kind
from meshcontract.transport import make_client, release
from nodeagent import policy
from nodeagent.credentials import BrokerLogin
from nodeagent.enrollment import TransientError
from nodeagent.errors import AgentError, RegistrationRefused
from nodeagent.identity import Identity
from nodeagent.membership import Applied
from nodeagent.meshstate import MeshState
from nodeagent.registrar_client import RegistrarClient
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Registration, StateStore
from nodeagent.underlay import EndpointSource, FixedEndpoints

log = logging.getLogger(__name__)

# CONNACK reason codes (MQTT 3.1.1 return codes 4 and 5 as paho maps them) meaning "not these credentials".
_AUTH_REFUSED = (0x86, 0x87)
_STOP_PUBLISH_TIMEOUT_S = 2.0

# How every connection's paho client is made; tests pass one that can inject faults (tests/faults.py).
ClientFactory = Callable[..., mqtt.Client]


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


def verified_reply(payload: bytes, verifier: Verifier, *, mesh: str) -> RegisterReply:
    """A registration reply from reply/<node>, signed by the registrar; ContractError otherwise (a broker could
    publish there, and would hand us a made-up address or settings)."""
    reply = messages.decode(RegisterReply, payload)
    verifier.verify(reply, kind=str(Kind.REPLY), mesh=mesh)
    return reply


@dataclass
class _Connection:
    """One MQTT connection attempt and what happened on it so far."""

    client: mqtt.Client
    epoch: int
    connected: threading.Event
    subscribed: threading.Event
    lost: threading.Event
    sub_mid: int | None = None
    auth_refused: bool = False  # the broker refused our credential (CONNACK "not authorized")
    snapshot_subscribed: bool = False
    subscriptions: list[str] = field(default_factory=list)


class ControlSession:
    """The agent's link to the control plane. `start()`, `heartbeat()` periodically, `stop()`."""

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
        self._endpoints = endpoints or FixedEndpoints([identity.endpoint] if identity.endpoint else [])
        self._registered_endpoints: list[Endpoint] | None = None  # what the registrar last confirmed
        self._reregistering = threading.Lock()  # one re-registration on the current connection at a time
        self._store = store
        self._login = login
        self._mesh = mesh
        self._verifier = verifier
        self._on_event = on_event
        self._clock = clock
        self._client_factory = client_factory
        self._lock = threading.Lock()
        self._reply_cond = threading.Condition(self._lock)  # guards everything below
        self._registration = registration
        self._conn: _Connection | None = None
        self._replies: dict[str, RegisterReply] = {}
        self._registrar_online = False
        self._registrar_kicks = 0  # bumped when the registrar comes online: cuts registration backoff short
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
        with self._reply_cond:
            conn = self._conn
            self._reply_cond.notify_all()  # ...also while it waits for a registration reply
        if conn is not None:
            conn.lost.set()  # wakes the session thread, which says goodbye on the broker
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
        with self._lock:
            return self._registrar_online

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
                registered = self._one_connection()
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

    def _new_connection(self) -> _Connection:
        epoch = policy.next_epoch(self._store.epoch(), now_ms=int(self._clock() * 1000))
        self._store.save_epoch(epoch)
        client = self._client_factory(self._login.next_settings(), client_id=self._me.node_id)
        # A bug in one of our callbacks must not kill paho's network thread (the session would hang, neither
        # connected nor lost): paho logs the exception and carries on.
        client.enable_logger(logging.getLogger("nodeagent.mqtt"))
        client.suppress_exceptions = True
        conn = _Connection(client, epoch, threading.Event(), threading.Event(), threading.Event())
        will = NodeStatus(
            node_id=self._me.node_id, state="offline", epoch=epoch, at=self._clock(), last_will=True
        )
        client.will_set(self._topic(Kind.STATUS, self._me.node_id), messages.encode(will), qos=1, retain=True)
        client.on_connect = lambda c, u, flags, rc, props: self._on_connect(conn, rc)
        client.on_subscribe = lambda c, u, mid, rcs, props: self._on_subscribe(conn, mid, rcs)
        client.on_disconnect = lambda c, u, flags, rc, props: self._on_disconnect(conn)
        client.on_message = lambda c, u, msg: self._on_message(conn, msg)
        return conn

    def _one_connection(self) -> bool | None:
        """Connect, register and serve until the connection is lost or we stop.

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
        try:
            registration = self.registration
            ttl = registration.settings.heartbeat_ttl_s if registration else None
            conn.client.connect(host, port, keepalive=policy.mqtt_keepalive(broker.keepalive_s, ttl))
        except OSError as exc:
            log.warning("broker %s unreachable: %s", broker.url, exc, extra=self._fields())
            return None
        conn.client.loop_start()
        registered = self._serve(conn)
        if self._stopping.is_set():
            # Say goodbye even if this connection never got registered: an offline status with a newer epoch
            # ends our membership at once instead of after the TTL. Not when refused.
            self._close(conn, goodbye=not self._refused)
        else:
            release(conn.client)
        return registered

    def _serve(self, conn: _Connection) -> bool:
        """Register on `conn` and stay until it is lost or we stop. True if registration succeeded."""
        # Subscribed before registering: the reply (and membership) must have somewhere to land.
        while not conn.subscribed.wait(0.1):
            if conn.lost.is_set():
                return False
        try:
            registered = self._register(conn)
        except RegistrationRefused as exc:
            log.error("%s", exc, extra=self._fields())
            self._refused = True
            self._stopping.set()
            self._on_event(Refused(exc))
            return False
        if not registered:
            return False
        conn.lost.wait()
        self.registered.clear()
        if not self._stopping.is_set():
            log.warning("lost the broker connection; keeping every tunnel", extra=self._fields())
        return True

    def _register(self, conn: _Connection) -> bool:
        """Send RegisterRequests until one is answered. False if the connection was lost or we stop.

        Retries back off (with jitter) up to REGISTER_RETRY_CAP_S, but a registrar coming online cuts the wait
        short: it restarted, and answering it quickly keeps us inside its grace period. A late answer to the
        last request, arriving during the backoff, still counts.
        """
        timeout = self._settings.register_timeout_s
        attempt = 0
        endpoints = self._endpoints.before_registration()
        while not conn.lost.is_set():
            with self._reply_cond:
                kicks = self._registrar_kicks
            request_id = self._send_register(conn, endpoints=endpoints)
            # A registrar that comes online after this request was sent (live, not the retained status we get
            # on subscribing) never saw it: send it again at once instead of after the timeout.
            reply = self._wait_reply(conn, request_id, timeout, kicks_before=kicks)
            if reply is None and self._registrar_kicks != kicks and not conn.lost.is_set():
                log.info("registrar came online; registering again", extra=self._fields())
                continue
            verdict = policy.judge_reply(reply, timeout_s=timeout)
            while verdict.action == "retry":
                if conn.lost.is_set():
                    return False
                delay = policy.backoff_delay(
                    attempt, base=policy.REGISTER_RETRY_BASE_S, cap=policy.REGISTER_RETRY_CAP_S
                )
                attempt += 1
                log.warning(
                    "registration: %s; retrying in %.1fs", verdict.reason, delay, extra=self._fields()
                )
                reply = self._wait_reply(conn, request_id, delay)
                if reply is None:
                    break  # backoff over (or the registrar came online): send a new request
                verdict = policy.judge_reply(reply, timeout_s=timeout)
            if verdict.action == "rekey":
                verdict = self._rekey_over_https(conn)
                if verdict.action == "registered":
                    continue  # the registrar has our key now: register this session over MQTT again
                if verdict.action == "retry":
                    delay = policy.backoff_delay(
                        attempt, base=policy.REGISTER_RETRY_BASE_S, cap=policy.REGISTER_RETRY_CAP_S
                    )
                    attempt += 1
                    log.warning("registration: %s; retrying in %.1fs", verdict.reason, delay, extra=self._fields())
                    conn.lost.wait(delay)
                    continue
            if verdict.action == "fatal":
                raise RegistrationRefused(verdict.code or ErrorCode.INTERNAL.value, verdict.reason)
            if verdict.action == "registered":
                assert reply is not None
                with self._lock:
                    self._registered_endpoints = endpoints
                self._registered(conn, reply)
                return True
        return False

    def _request(self, me: Identity, *, epoch: int, endpoints: list[Endpoint] | None = None) -> RegisterRequest:
        return RegisterRequest(
            request_id=secrets.token_urlsafe(12),
            node_id=me.node_id,
            name=me.name,
            public_key=me.public_key,
            endpoints=self._endpoints.current() if endpoints is None else endpoints,
            listen_port=self._settings.listen_port,
            epoch=epoch,
        )

    def _send_register(
        self, conn: _Connection, identity: Identity | None = None, *, endpoints: list[Endpoint] | None = None
    ) -> str:
        me = identity or self._me
        request = self._request(me, epoch=conn.epoch, endpoints=endpoints)
        conn.client.publish(self._topic(Kind.REGISTER, me.node_id), messages.encode(request), qos=1)
        log.info("registering (epoch %s)", conn.epoch, extra=self._fields(epoch=conn.epoch))
        return request.request_id

    # -- key rotation (the local API's thread) -----------------------------------------------------------
    def rotate_key(self, identity: Identity) -> bool:
        """Register `identity` (this node with a new key) with the registrar over HTTPS, and make it ours.

        True if the registrar confirmed it. False if it could not be asked (or did not answer): the new key is
        ours anyway, and the current connection is closed cleanly so the next one registers it (a registrar that
        still holds the old key answers rekey_over_https, and the session registers the new one over HTTPS).
        AgentError, changing nothing, if the registrar refused the new key or there is no HTTPS door to it.
        """
        if self._registrar is None:
            raise AgentError("no registrar URL known (not enrolled over HTTPS?); the key is unchanged")
        with self._lock:
            conn = self._conn
        if conn is None or conn.lost.is_set() or not self.registered.is_set():
            # Peers learn the new key from the registrar's next delta, through the broker: without it, switching
            # would cut us off from every peer until the broker is back.
            raise AgentError(
                "not registered on the broker right now; the key is unchanged "
                "(retry when `meshctl status` shows the broker connected)"
            )
        try:
            # Ask first: while the registrar is away a new key would cut us off from every peer until it is
            # back, so refuse then. Only a registrar lost in the middle of the registration leaves us unsure.
            if not self._registrar.identity_valid():
                raise AgentError("the registrar does not accept this node's credential; the key is unchanged")
        except TransientError as exc:
            raise AgentError(f"the registrar cannot be reached ({exc}); the key is unchanged") from exc
        try:
            reply = self._registrar.register(self._request(identity, epoch=self._store.epoch() or 0))
        except TransientError as exc:
            log.warning("could not reach the registrar to register the new key (%s); using it and registering it "
                        "on a new connection", exc, extra=self._fields())  # fmt: skip
            self._me = identity
            if conn is not None and not conn.lost.is_set():
                conn.client.disconnect()  # clean: no will; the session reconnects with a new epoch and registers
            return False
        if not reply.ok:
            error = reply.error
            raise AgentError(
                f"the registrar refused the new key ({error.code}: {error.message}); the key is unchanged"
                if error else "the registrar refused the new key; the key is unchanged"
            )
        self._me = identity
        log.info("key rotated: registered public key %s", identity.public_key, extra=self._fields(event="rotated"))
        return True

    def _rekey_over_https(self, conn: _Connection) -> policy.Verdict:
        """The registrar holds another key for us (a rotation a crash or a lost answer left half done): register
        ours over HTTPS. The verdict on that answer ("registered" means: register over MQTT again now)."""
        if self._registrar is None:
            return policy.Verdict("fatal", ErrorCode.REKEY_OVER_HTTPS.value,
                                  "the registrar holds another key for this node and no HTTPS door to it is known")  # fmt: skip
        try:
            reply = self._registrar.register(self._request(self._me, epoch=conn.epoch))
        except TransientError as exc:
            return policy.Verdict("retry", None, f"registering our key over HTTPS: {exc}")
        verdict = policy.judge_reply(reply, timeout_s=0)
        if verdict.action == "registered":
            log.info("registered our WireGuard key over HTTPS (the registrar held another one)", extra=self._fields())
        return verdict

    # -- endpoint updates (the agent's timer) --------------------------------------------------------------
    def update_endpoints(self) -> bool:
        """Register again on the current connection if the endpoint candidates changed since the registrar last
        confirmed them (an address came or went, the NAT's outside address changed). True if it confirmed the new
        ones; False if nothing changed, we are not registered with an online registrar now (the next
        registration carries them), or it did not confirm (the next call tries again)."""
        endpoints = self._endpoints.current()
        with self._lock:
            conn, confirmed, online = self._conn, self._registered_endpoints, self._registrar_online
        if endpoints == confirmed or conn is None or conn.lost.is_set() or not self.registered.is_set() or not online:
            return False
        with self._reregistering:
            request_id = self._send_register(conn, endpoints=endpoints)
            reply = self._wait_reply(conn, request_id, self._settings.register_timeout_s)
        if reply is None or not reply.ok:
            why = "no answer in time" if reply is None else (reply.error.message if reply.error else "refused")
            log.warning("the registrar did not take our new endpoints (%s); trying again later", why,
                        extra=self._fields())  # fmt: skip
            return False
        with self._lock:
            self._registered_endpoints = endpoints
        log.info("registered new endpoint candidates: %s", ", ".join(map(str, endpoints)) or "none",
                 extra=self._fields(event="endpoints_registered"))  # fmt: skip
        return True

    def _wait_reply(
        self, conn: _Connection, request_id: str, timeout: float, *, kicks_before: int | None = None
    ) -> RegisterReply | None:
        """The reply to `request_id` if it arrives within `timeout`, else None. Returns None early when the
        connection is lost or the registrar comes online (since `kicks_before`, by default since now)."""
        deadline = time.monotonic() + timeout
        with self._reply_cond:
            kicks = self._registrar_kicks if kicks_before is None else kicks_before
            while request_id not in self._replies and not conn.lost.is_set():
                if self._registrar_kicks != kicks:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._reply_cond.wait(remaining)
            reply = self._replies.pop(request_id, None)
            self._replies.clear()  # answers to older requests are of no use any more
            return reply

    def _registered(self, conn: _Connection, reply: RegisterReply) -> None:
        if (
            reply.node_id != self._me.node_id
            or reply.mesh_ip is None
            or reply.prefix_len is None
            or reply.settings is None
        ):
            raise RegistrationRefused(
                ErrorCode.INVALID_REQUEST.value, f"incomplete registration reply: {reply}"
            )
        registration = Registration(
            mesh_ip=reply.mesh_ip, prefix_len=reply.prefix_len, settings=reply.settings
        )
        with self._lock:
            previous, self._registration = self._registration, registration
        if registration != previous:
            self._store.save_registration(registration)
        log.info(
            "registered as %s/%s",
            reply.mesh_ip,
            reply.prefix_len,
            extra=self._fields(epoch=conn.epoch, event="registered"),
        )
        online = NodeStatus(node_id=self._me.node_id, state="online", epoch=conn.epoch, at=self._clock())
        conn.client.publish(
            self._topic(Kind.STATUS, self._me.node_id), messages.encode(online), qos=1, retain=True
        )
        self._on_event(Registered(registration, conn.epoch))
        self.heartbeat()
        self.registered.set()

    def _close(self, conn: _Connection, *, goodbye: bool) -> None:
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
    def _on_connect(self, conn: _Connection, reason_code: mqtt.ReasonCode) -> None:
        if reason_code.is_failure:
            conn.auth_refused = reason_code.value in _AUTH_REFUSED
            hint = (
                "the configured broker.password" if self._login.configured else "this node's own credential"
            ) if reason_code.value in _AUTH_REFUSED else "the broker"
            log.error("broker refused the connection: %s (check %s)", reason_code, hint, extra=self._fields())
            return
        log.info("connected to the broker %s", self._login.broker.url, extra=self._fields())
        conn.connected.set()
        with self._lock:
            # Unknown until the retained RegistrarStatus arrives: a broker that restarted empty has none, and
            # the registrar's will may have been lost with the old broker.
            self._registrar_online = False
        # Deltas may have been missed while we were away: follow them again from the retained snapshot.
        self._mesh.resync()
        subscriptions = [
            (self._topic(Kind.REPLY, self._me.node_id), 1),
            (self._topic(Kind.DELTA), 1),
            (self._topic(Kind.REGISTRAR), 1),
            (self._topic(Kind.SNAPSHOT), 1),
        ]
        conn.snapshot_subscribed = True
        conn.subscriptions = [topic for topic, _ in subscriptions]
        _, conn.sub_mid = conn.client.subscribe(subscriptions)

    def _on_subscribe(self, conn: _Connection, mid: int, reason_codes: list[mqtt.ReasonCode]) -> None:
        if mid != conn.sub_mid:
            return
        refused = [topic for topic, rc in zip(conn.subscriptions, reason_codes, strict=False) if rc.is_failure]
        if refused:
            log.error("broker refused our subscription to %s (access rules?)", ", ".join(refused), extra=self._fields())
        conn.subscribed.set()

    def _on_disconnect(self, conn: _Connection) -> None:
        conn.lost.set()
        with self._reply_cond:
            self._reply_cond.notify_all()
        # One paho client per connection: stop this one's thread instead of letting paho reconnect it with
        # the old epoch and will. The session thread builds the next connection.
        conn.client.loop_stop()

    def _on_message(self, conn: _Connection, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = topics.parse(msg.topic)
            if topic.mesh != self._settings.mesh:
                return
            if topic.kind is Kind.REPLY:
                reply = verified_reply(msg.payload, self._verifier, mesh=self._settings.mesh)
                with self._reply_cond:
                    self._replies[reply.request_id] = reply
                    self._reply_cond.notify_all()
            elif topic.kind is Kind.SNAPSHOT:
                snapshot = self._verified(MembershipSnapshot, msg.payload, Kind.SNAPSHOT)
                self._followed(conn, self._mesh.apply_snapshot(snapshot), snapshot.revision)
            elif topic.kind is Kind.DELTA:
                delta = self._verified(MembershipDelta, msg.payload, Kind.DELTA)
                self._followed(conn, self._mesh.apply_delta(delta), delta.to_revision)
            elif topic.kind is Kind.REGISTRAR:
                self._on_registrar(messages.decode(RegistrarStatus, msg.payload), retained=msg.retain)
        except ContractError as exc:
            log.warning("dropping message on %s: %s", msg.topic, exc, extra=self._fields())

    def _verified(self, model, payload: bytes, kind: Kind):
        """Decode a membership message and check the registrar's signature on it (ContractError if bad)."""
        message = messages.decode(model, payload, max_size=messages.MAX_MEMBERSHIP_PAYLOAD)
        if message.mesh != self._settings.mesh:
            raise ContractError(f"{kind} for mesh {message.mesh!r} on our mesh's topic")
        self._verifier.verify(message, kind=str(kind), mesh=self._settings.mesh)
        return message

    def _followed(self, conn: _Connection, result: Applied, revision: int) -> None:
        if result is Applied.GAP:
            log.info("missed a membership delta before revision %s: resyncing from the snapshot", revision)
        syncing = self._mesh.syncing
        # Hold the snapshot subscription exactly while syncing. Subscribing again delivers the retained one.
        if syncing != conn.snapshot_subscribed and not conn.lost.is_set():
            snapshot = self._topic(Kind.SNAPSHOT)
            if syncing:
                conn.client.subscribe(snapshot, qos=1)
            else:
                conn.client.unsubscribe(snapshot)
            conn.snapshot_subscribed = syncing
        if result in (Applied.ADOPTED, Applied.APPLIED):
            self._on_event(MembershipChanged())

    def _on_registrar(self, status: RegistrarStatus, *, retained: bool) -> None:
        online = status.state == "online"
        with self._reply_cond:
            was, self._registrar_online = self._registrar_online, online
            # A retained status is what we learn on subscribing, not a registrar that just came online.
            if online and not was and not retained:
                self._registrar_kicks += 1
                self._reply_cond.notify_all()
        if was != online:
            log.info("registrar is %s", status.state, extra=self._fields())
