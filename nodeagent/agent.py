"""The node agent: one MQTT session to the control plane, one reconcile loop, one local API.

Threads and who owns what:
  - the *session* thread (`_run_session`) owns the connection: it creates one paho client per connection
    (each with a new epoch and a last-will carrying it), registers, publishes status, and reconnects with
    backoff and jitter. It never touches WireGuard.
  - paho's network thread runs the callbacks: it decodes messages into the membership view and wakes the
    reconcile loop. It never blocks and never touches WireGuard.
  - the *reconcile* thread (`_run_reconcile`) is the only one that changes the interface: on every wake-up
    (bursts coalesce into one) and every `reconcile_interval_s` it applies the newest complete membership.
  - apscheduler's thread publishes heartbeats; the local API serves meshctl from its own threads.

The agent's view of the mesh only ever shrinks the peer set from a *complete* membership, so a broker restart,
a registrar outage or a half-delivered retained state never tears down a working tunnel.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from apscheduler.schedulers.background import BackgroundScheduler

from meshcontract import messages, topics
from meshcontract.access import JOIN_PASSWORD_PREFIX
from meshcontract.errors import ContractError
from meshcontract.localapi import AgentStatus, LocalRequest, LocalResponse, PeerView, PingResult
from meshcontract.messages import (
    Endpoint,
    ErrorCode,
    Heartbeat,
    MemberRecord,
    NodeStatus,
    RegisterReply,
    RegisterRequest,
    RegistrarStatus,
    Roster,
)
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings, make_client
from nodeagent.errors import AgentError, RegistrationRefused, SettingsError, StateDirError
from nodeagent.membership import Membership, MembershipView
from nodeagent.ping import Pinger, SystemPinger
from nodeagent.reconcile import DEFAULT_KEEPALIVE_S, desired_peers, plan_reconcile
from nodeagent.session import Login, backoff_delay, login_order, next_epoch
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Registration, StateStore
from wgctl.errors import WireGuardError
from wgctl.model import RouteBackend, WireGuardBackend

log = logging.getLogger(__name__)

# CONNACK reason codes (MQTT 3.1.1 return codes 4 and 5 as paho maps them) meaning "not these credentials".
_AUTH_REFUSED = (0x86, 0x87)

EXIT_REFUSED = 3
# Refusals that no retry can fix; anything else (e.g. "internal") is retried with backoff.
_FATAL_CODES = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.INVALID_TOKEN,
        ErrorCode.TOKEN_EXPIRED,
        ErrorCode.TOKEN_USED,
        ErrorCode.INVALID_KEY,
        ErrorCode.KEY_CONFLICT,
        ErrorCode.POOL_EXHAUSTED,
    }
)
_STOP_PUBLISH_TIMEOUT_S = 2.0


def default_route_ipv4() -> str:
    """The source address the kernel would use towards the internet: the primary IPv4 of the default route.

    Connecting a UDP socket sends nothing; it only asks the routing table for a source address.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: never answered, only routed
        except OSError as exc:
            raise SettingsError(
                f"no endpoint given and no IPv4 default route to derive one from: {exc}"
            ) from exc
        return sock.getsockname()[0]


def parse_endpoint(text: str, *, default_port: int) -> Endpoint:
    """HOST, HOST:PORT, [V6] or [V6]:PORT -> Endpoint; SettingsError if it is not one."""
    host, port = text.strip(), default_port
    try:
        if host.startswith("["):
            inner, _, rest = host[1:].partition("]")
            host = inner
            if rest.startswith(":"):
                port = int(rest[1:])
        elif host.count(":") == 1:
            host, port_text = host.split(":")
            port = int(port_text)
        return Endpoint(host=host, port=port)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise SettingsError(f"endpoint {text!r} is not HOST[:PORT]: {exc}") from exc


@dataclass
class _Connection:
    """One MQTT connection attempt and what happened on it so far."""

    client: mqtt.Client
    epoch: int
    connected: threading.Event
    subscribed: threading.Event
    lost: threading.Event
    sub_mid: int | None = None


class Agent:
    """The node daemon. `start()` returns at once; `wait()` blocks until a stop or a fatal refusal; `stop()`.

    Backends are injected so tests can run several agents in one process on in-memory WireGuard:
    `Agent(settings, wireguard=InMemoryWireGuard(), routes=InMemoryRoutes(wg))`.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        wireguard: WireGuardBackend,
        routes: RouteBackend,
        clock: Callable[[], float] = time.time,
        pinger: Pinger | None = None,
        local_api: bool = True,
        hostname: str | None = None,
    ) -> None:
        self.settings = settings
        self.wireguard = wireguard
        self.routes = routes
        self._clock = clock
        self._pinger = pinger or SystemPinger()
        self._local_api_enabled = local_api
        self._hostname = hostname
        self.store = StateStore(settings.state_dir)

        self._lock = threading.RLock()  # guards the view, registration, connection and persisted state
        self._view = MembershipView()
        self._known: dict[
            str, MemberRecord
        ] = {}  # every record ever seen, by public key: names removed peers
        self._persisted: Membership | None = None
        self._registration: Registration | None = None
        self._registrar_online = False
        self._conn: _Connection | None = None
        self._reply_cond = threading.Condition(self._lock)
        self._replies: dict[str, RegisterReply] = {}
        self._registrar_kicks = 0  # bumped when the registrar comes online: cuts registration backoff short
        self._epoch: int | None = None
        self._heartbeat_seq = 0

        self._stopping = threading.Event()
        self._crashed = False
        self._heartbeats_paused = False
        self._finished = threading.Event()
        self._wake_reconcile = threading.Event()
        self._reconcile_lock = threading.Lock()
        self.registered = threading.Event()  # set after each successful registration, cleared on disconnect
        self.exit_code = 0
        self.failure: AgentError | None = None
        self.reconcile_count = 0

        self._threads: list[threading.Thread] = []
        self._scheduler: BackgroundScheduler | None = None
        self._api = None

        self.node_id = ""
        self.name = ""
        self.private_key = ""
        self.public_key = ""
        self.endpoint: Endpoint | None = None
        self._own_password: str | None = None  # None when broker.password is configured
        self._logins: tuple[Login, ...] = (Login.CONFIGURED,)
        self._login_at = 0  # index into _logins of the credential the next connection uses

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load identity and persisted state, restore the mesh from it, then start talking to the broker.

        Raises AgentError (SettingsError, StateDirError) or ContractError (a malformed broker URL) for problems
        no retry can fix, and WireGuardError if the backend cannot be used at all.
        """
        from wgctl import keys  # local: keeps module import light for meshctl

        self.settings.broker.host_port()  # a malformed broker URL is a start-up error, not a retry loop
        self.store.ensure_dir()
        self.private_key = self.store.private_key()
        self.public_key = keys.public_key(self.private_key)
        self.node_id = self.store.node_id(self.settings.node_id)
        self._init_credentials()
        self.name = self.settings.name or self._hostname or socket.gethostname()
        self.endpoint = parse_endpoint(
            self.settings.endpoint or default_route_ipv4(), default_port=self.settings.listen_port
        )
        self._registration = self.store.registration()
        self._persisted = self.store.membership()
        if self._persisted is not None:
            for record in self._persisted.members.values():
                self._known[record.public_key] = record
        log.info(
            "agent starting: interface %s, endpoint %s, %s persisted members",
            self.settings.interface,
            self.endpoint,
            len(self._persisted.members) if self._persisted else "no",
            extra=self._self_extra(),
        )
        # The interface itself must be usable; a permanent backend error ends start-up with a clear message.
        self.wireguard.ensure_interface(
            self.settings.interface, private_key=self.private_key, listen_port=self.settings.listen_port
        )
        # Before the broker is reachable: an agent restarted during a control-plane outage restores the mesh.
        self._reconcile_once("startup")

        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.start()
        if self._registration is not None:
            # Heartbeat from the first connection on, as an agent that merely reconnected does: a registrar that
            # comes back after us must not find us silent while our registration waits for its answer.
            self._schedule_heartbeats(self._registration.settings.heartbeat_interval_s)
        if self._local_api_enabled:
            from nodeagent.localapi_server import LocalApiServer

            self._api = LocalApiServer(
                self.settings.socket_path,
                self.handle_local,
                mode=self.settings.socket_mode,
                group=self.settings.socket_group,
            )
            self._api.start()
        for target, name in ((self._run_session, "session"), (self._run_reconcile, "reconcile")):
            thread = threading.Thread(target=target, name=f"agent-{name}-{self.node_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `request_stop()` or a fatal error; True if that happened within `timeout`."""
        return self._finished.wait(timeout)

    def request_stop(self) -> None:
        """Ask `wait()` to return (signal handlers call this); `stop()` does the work."""
        self._finished.set()

    def stop(self) -> None:
        """Graceful stop: status offline (retained), clean disconnect (no will), keep the interface by default."""
        self._stopping.set()
        self._finished.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            conn.lost.set()  # wakes the session thread, which says goodbye on the broker
        with self._reply_cond:
            self._reply_cond.notify_all()  # ...also while it waits for a registration reply
        self._wake_reconcile.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._api is not None:
            self._api.stop()
            self._api = None
        if not self._crashed and not self.settings.keep_interface_on_stop:
            self.wireguard.delete_interface(self.settings.interface)
            log.info("interface %s deleted", self.settings.interface, extra=self._self_extra())
        log.info("agent stopped", extra=self._self_extra())

    def simulate_crash(self) -> None:
        """Test hook: die like a killed process. The TCP connection is cut without DISCONNECT (the broker
        publishes our will), nothing more is published, and the interface stays as it was."""
        self._crashed = True
        with self._lock:
            conn = self._conn
        if conn is not None:
            sock = conn.client.socket()
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.stop()

    def pause_heartbeats(self, paused: bool = True) -> None:
        """Failure injection: stop (or resume) heartbeats while staying connected, which is how a frozen or
        partitioned node looks to the registrar: no will fires, only the heartbeat TTL notices."""
        self._heartbeats_paused = paused
        log.warning("heartbeats %s", "paused" if paused else "resumed", extra=self._self_extra())

    # -- state for callers ------------------------------------------------------------------------------
    @property
    def mesh_ip(self) -> str | None:
        with self._lock:
            return None if self._registration is None else self._registration.mesh_ip

    @property
    def broker_connected(self) -> bool:
        with self._lock:
            return self._conn is not None and self._conn.connected.is_set() and not self._conn.lost.is_set()

    def membership(self) -> Membership | None:
        """The membership reconcile works from: the newest complete view, else the persisted one."""
        with self._lock:
            return self._view.complete() or self._persisted

    def _self_extra(self) -> dict[str, str]:
        return {"node_id": self.node_id, "node_name": self.name, "mesh_ip": self.mesh_ip or "-"}

    # -- reconcile --------------------------------------------------------------------------------------
    def _run_reconcile(self) -> None:
        while not self._stopping.is_set():
            woke = self._wake_reconcile.wait(self.settings.reconcile_interval_s)
            if self._stopping.is_set():
                return
            # Clear before reading state: a change that lands while we work sets it again, so the newest
            # state is never missed, and any number of changes during one pass cost one more pass.
            self._wake_reconcile.clear()
            try:
                self._reconcile_once("membership change" if woke else "periodic")
            except Exception:  # the daemon loop: log, keep the tunnels, try again next interval
                log.exception("reconcile failed; retrying in %ss", self.settings.reconcile_interval_s)

    def _keepalive(self, registration: Registration | None) -> int:
        if self.settings.persistent_keepalive_s is not None:
            return self.settings.persistent_keepalive_s
        if registration is not None:
            return registration.settings.persistent_keepalive_s
        return DEFAULT_KEEPALIVE_S

    def _reconcile_once(self, reason: str) -> None:
        """Bring the interface, its address, link, route and peers to the desired state; apply only changes."""
        with self._reconcile_lock:
            with self._lock:
                membership = self._view.complete() or self._persisted
                registration = self._registration
                known = dict(self._known)
                persisted = self._persisted
            ifname = self.settings.interface
            try:
                self.wireguard.ensure_interface(
                    ifname, private_key=self.private_key, listen_port=self.settings.listen_port
                )
                if registration is not None:
                    address = f"{registration.mesh_ip}/{registration.prefix_len}"
                    if self.routes.ensure_address(ifname, address):
                        log.info("address %s set on %s", address, ifname, extra=self._self_extra())
                    if self.routes.ensure_up(ifname, mtu=registration.settings.mtu):
                        log.info(
                            "link %s up, mtu %s", ifname, registration.settings.mtu, extra=self._self_extra()
                        )
                    if self.routes.ensure_route(ifname, registration.settings.network):
                        log.info(
                            "route %s via %s", registration.settings.network, ifname, extra=self._self_extra()
                        )
                if membership is None:
                    return  # never seen a complete membership: no opinion on peers, so touch none
                actual = self.wireguard.read(ifname).peers
                desired = desired_peers(
                    membership,
                    self_id=self.node_id,
                    self_public_key=self.public_key,
                    keepalive=self._keepalive(registration),
                )
                for record in membership.members.values():
                    known[record.public_key] = record
                plan = plan_reconcile(desired, actual, members_by_key=known)
                if not plan.changes.is_empty():
                    self.wireguard.apply(ifname, plan.changes)
            except WireGuardError as exc:
                log.warning("reconcile (%s) failed, will retry: %s", reason, exc, extra=self._self_extra())
                return
            self.reconcile_count += 1
            for event in plan.events:
                member = event.member
                log.info(
                    "peer %s",
                    event.kind,
                    extra={
                        "node_id": member.node_id if member else "?",
                        "node_name": member.name if member else "?",
                        "mesh_ip": member.mesh_ip if member else "?",
                        "peer": event.public_key,
                        "revision": membership.revision,
                    },
                )
            with self._lock:
                self._known.update(known)
            if membership != persisted:
                try:
                    self.store.save_membership(membership)
                except StateDirError as exc:
                    log.error("cannot persist membership: %s", exc)
                    return
                with self._lock:
                    self._persisted = membership

    # -- MQTT session -----------------------------------------------------------------------------------
    def _init_credentials(self) -> None:
        # Our own broker password exists (on disk, 0600) before we first connect: whatever the registrar stores
        # from our RegisterRequest, we hold too, even if we crash or its reply is lost.
        configured = self.settings.broker.password is not None
        if not configured:
            self._own_password = self.store.own_broker_password()
        self._set_logins(accepted=self.store.broker_password_accepted())

    def _set_logins(self, *, accepted: bool) -> None:
        with self._lock:
            self._logins = login_order(
                configured=self._own_password is None,
                own_accepted=accepted,
                has_token=bool(self.settings.join_token),
            )
            self._login_at = 0

    def _broker_settings(self) -> BrokerSettings:
        broker = self.settings.broker
        with self._lock:
            login = self._logins[self._login_at]
        if login is Login.CONFIGURED:
            password = broker.password
        elif login is Login.OWN:
            password = self._own_password
        else:
            password = JOIN_PASSWORD_PREFIX + (self.settings.join_token or "")
        log.info("logging in to the broker with %s", login.value, extra=self._self_extra())
        return broker.model_copy(update={"username": broker.username or self.node_id, "password": password})

    def _login_refused(self) -> None:
        """The broker refused our credential: the next connection tries the next one (see login_order)."""
        with self._lock:
            if len(self._logins) < 2:
                return
            refused = self._logins[self._login_at]
            self._login_at = (self._login_at + 1) % len(self._logins)
            following = self._logins[self._login_at]
        log.warning(
            "broker refused %s; next attempt uses %s", refused.value, following.value, extra=self._self_extra()
        )

    def _topic(self, kind: Kind, node: str | None = None) -> str:
        return topics.build(self.settings.mesh, kind, node)

    def _new_connection(self) -> _Connection:
        epoch = next_epoch(self.store.epoch(), now_ms=int(self._clock() * 1000))
        self.store.save_epoch(epoch)
        client = make_client(self._broker_settings(), client_id=self.node_id)
        # A bug in one of our callbacks must not kill paho's network thread (the session would hang, neither
        # connected nor lost): paho logs the exception and carries on.
        client.enable_logger(logging.getLogger("nodeagent.mqtt"))
        client.suppress_exceptions = True
        conn = _Connection(client, epoch, threading.Event(), threading.Event(), threading.Event())
        will = NodeStatus(node_id=self.node_id, state="offline", epoch=epoch, at=self._clock(), last_will=True)
        client.will_set(self._topic(Kind.STATUS, self.node_id), messages.encode(will), qos=1, retain=True)
        client.on_connect = lambda c, u, flags, rc, props: self._on_connect(conn, rc)
        client.on_subscribe = lambda c, u, mid, rcs, props: self._on_subscribe(conn, mid, rcs)
        client.on_disconnect = lambda c, u, flags, rc, props: self._on_disconnect(conn, rc)
        client.on_message = lambda c, u, msg: self._on_message(msg)
        return conn

    def _reconnect_cap(self) -> float:
        """Longest wait between reconnect attempts: half the heartbeat TTL (once known), at most 30 s.

        After an outage the registrar waits about one TTL (its grace period) before it declares silent nodes
        unreachable; an agent still sleeping in a long backoff when the broker returns would be removed from
        every peer although nothing is wrong with it. Jitter still spreads a fleet within that window.
        """
        with self._lock:
            registration = self._registration
        if registration is None:
            return 30.0
        return min(30.0, max(1.0, registration.settings.heartbeat_ttl_s / 2))

    def _run_session(self) -> None:
        """The daemon loop of the control-plane session: one connection per iteration, until stopped."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                registered = self._one_connection()
            except Exception:  # the daemon loop: log, keep the tunnels, try again after a backoff
                log.exception("session failed; retrying", extra=self._self_extra())
                registered = None
            if self._stopping.is_set():
                return
            attempt = 0 if registered else attempt + 1
            delay = backoff_delay(attempt, cap=self._reconnect_cap())
            log.info("reconnecting to the broker in %.1fs", delay, extra=self._self_extra())
            self._stopping.wait(delay)

    def _one_connection(self) -> bool | None:
        """Connect, register and serve until the connection is lost or we stop.

        True if this connection registered, False if it did not, None if the broker was unreachable.
        """
        host, port, _ = self.settings.broker.host_port()
        conn = self._new_connection()
        with self._lock:
            self._conn = conn
            self._epoch = conn.epoch
        # stop() sets _stopping, then marks the connection it sees as lost; checking after publishing the
        # connection under the lock means one of the two always notices the other.
        if self._stopping.is_set():
            return None
        try:
            conn.client.connect(host, port, keepalive=self.settings.broker.keepalive_s)
        except OSError as exc:
            log.warning("broker %s unreachable: %s", self.settings.broker.url, exc, extra=self._self_extra())
            return None
        conn.client.loop_start()
        registered = self._serve_connection(conn)
        if self._stopping.is_set():
            # Say goodbye even if this connection never got registered: an offline status with a newer epoch
            # ends our membership at once instead of after the TTL. Not when crashed or refused.
            self._close_connection(conn, goodbye=not self._crashed and self.failure is None)
        else:
            conn.client.loop_stop()
        return registered

    def _serve_connection(self, conn: _Connection) -> bool:
        """Register on `conn` and stay until it is lost or we stop. True if registration succeeded."""
        # Subscribed before registering: the reply (and membership) must have somewhere to land.
        while not conn.subscribed.wait(0.1):
            if conn.lost.is_set():
                return False
        try:
            registered = self._register(conn)
        except RegistrationRefused as exc:
            log.error("%s", exc, extra=self._self_extra())
            self.failure = exc
            self.exit_code = EXIT_REFUSED
            self._stopping.set()
            self._finished.set()
            return False
        if not registered:
            return False
        conn.lost.wait()
        self.registered.clear()
        if not self._stopping.is_set():
            log.warning("lost the broker connection; keeping every tunnel", extra=self._self_extra())
        return True

    def _register(self, conn: _Connection) -> bool:
        """Send RegisterRequests until one is answered. False if the connection was lost or we stop.

        Retries back off (with jitter) up to 10 s, but a registrar coming online cuts the wait short: it
        restarted, and answering it quickly keeps us inside its grace period. A late answer to the last
        request, arriving during the backoff, still counts.
        """
        attempt = 0
        while not conn.lost.is_set():
            with self._reply_cond:
                kicks = self._registrar_kicks
            request_id = self._send_register(conn)
            # Kickable: a registrar that comes online after this request was sent (live, not the retained status
            # we get on subscribing) never saw it: send it again at once instead of after the timeout.
            reply = self._wait_reply(conn, request_id, self.settings.register_timeout_s, kicks_before=kicks)
            if reply is None and self._registrar_kicks != kicks and not conn.lost.is_set():
                log.info("registrar came online; registering again", extra=self._self_extra())
                continue
            why = f"no reply within {self.settings.register_timeout_s}s (registrar down?)"
            while reply is None or not reply.ok:
                if reply is not None:
                    error = reply.error
                    code = error.code if error else ErrorCode.INTERNAL
                    message = error.message if error else "no reason given"
                    if code in _FATAL_CODES:
                        raise RegistrationRefused(str(code), message)
                    why = f"refused for now ({code}: {message})"
                if conn.lost.is_set():
                    return False
                delay = backoff_delay(attempt, base=1.0, cap=10.0)
                attempt += 1
                log.warning("registration: %s; retrying in %.1fs", why, delay, extra=self._self_extra())
                reply = self._wait_reply(conn, request_id, delay)
                if reply is None:
                    break  # backoff over (or the registrar came online): send a new request
            if reply is not None and reply.ok:
                self._registered(conn, reply)
                return True
        return False

    def _send_register(self, conn: _Connection) -> str:
        request_id = secrets.token_urlsafe(12)
        assert self.endpoint is not None
        request = RegisterRequest(
            request_id=request_id,
            node_id=self.node_id,
            name=self.name,
            public_key=self.public_key,
            endpoints=[self.endpoint],
            listen_port=self.settings.listen_port,
            join_token=self.settings.join_token,
            epoch=conn.epoch,
            broker_password=self._offered_password(),
        )
        conn.client.publish(self._topic(Kind.REGISTER, self.node_id), messages.encode(request), qos=1)
        log.info("registering (epoch %s)", conn.epoch, extra={**self._self_extra(), "epoch": conn.epoch})
        return request_id

    def _offered_password(self) -> str | None:
        """Our own password for the RegisterRequest; None with a configured one (or a legacy one out of range)."""
        password = self._own_password
        if password is None or not 16 <= len(password) <= 128:
            return None
        return password

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
            reply.node_id != self.node_id
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
        if reply.broker_password and self.settings.broker.password is None:
            # An older registrar issued a password of its own (it stores none we send): use that from now on.
            self.store.save_broker_password(reply.broker_password)
            self._own_password = reply.broker_password
        if self._own_password is not None and not self.store.broker_password_accepted():
            # The registrar has an entry for us now (it writes it before answering): log in with it first.
            self.store.mark_broker_password_accepted()
            self._set_logins(accepted=True)
        with self._lock:
            previous = self._registration
            self._registration = registration
        if registration != previous:
            self.store.save_registration(registration)
        log.info(
            "registered as %s/%s",
            reply.mesh_ip,
            reply.prefix_len,
            extra={**self._self_extra(), "epoch": conn.epoch},
        )
        online = NodeStatus(node_id=self.node_id, state="online", epoch=conn.epoch, at=self._clock())
        conn.client.publish(
            self._topic(Kind.STATUS, self.node_id), messages.encode(online), qos=1, retain=True
        )
        self._schedule_heartbeats(registration.settings.heartbeat_interval_s)
        self._heartbeat()
        self.registered.set()
        self._wake_reconcile.set()

    def _schedule_heartbeats(self, interval_s: float) -> None:
        if self._scheduler is not None:
            self._scheduler.add_job(
                self._heartbeat,
                "interval",
                seconds=interval_s,
                id="heartbeat",
                replace_existing=True,
                max_instances=1,
                coalesce=True,
            )

    def _heartbeat(self) -> None:
        with self._lock:
            conn = self._conn
            seq = self._heartbeat_seq
            self._heartbeat_seq += 1
        if conn is None or conn.lost.is_set() or self._crashed or self._heartbeats_paused:
            return
        beat = Heartbeat(node_id=self.node_id, epoch=conn.epoch, seq=seq, sent_at=self._clock())
        conn.client.publish(self._topic(Kind.HEARTBEAT, self.node_id), messages.encode(beat), qos=0)

    def _close_connection(self, conn: _Connection, *, goodbye: bool) -> None:
        if goodbye and conn.connected.is_set():
            offline = NodeStatus(node_id=self.node_id, state="offline", epoch=conn.epoch, at=self._clock())
            info = conn.client.publish(
                self._topic(Kind.STATUS, self.node_id), messages.encode(offline), qos=1, retain=True
            )
            try:
                info.wait_for_publish(timeout=_STOP_PUBLISH_TIMEOUT_S)
            except (RuntimeError, ValueError) as exc:  # paho: not queued / connection gone
                log.warning("could not publish offline status: %s", exc)
            log.info("published status offline", extra=self._self_extra())
        if not self._crashed:
            conn.client.disconnect()  # a clean DISCONNECT: the broker discards our will
        conn.client.loop_stop()

    # -- paho callbacks (network thread: never block here) ----------------------------------------------
    def _on_connect(self, conn: _Connection, reason_code: mqtt.ReasonCode) -> None:
        if reason_code.is_failure:
            with self._lock:
                fallback = len(self._logins) > 1
            # With another credential to try this is expected once (e.g. the token after the registrar stored
            # our password): a warning; with nothing else to try it needs an operator.
            level = logging.WARNING if fallback and reason_code.value in _AUTH_REFUSED else logging.ERROR
            log.log(
                level,
                "broker refused the connection: %s (check broker.username/password or the join token)",
                reason_code,
                extra=self._self_extra(),
            )
            if reason_code.value in _AUTH_REFUSED:
                self._login_refused()
            return
        log.info("connected to the broker %s", self.settings.broker.url, extra=self._self_extra())
        conn.connected.set()
        with self._lock:
            # Unknown until the retained RegistrarStatus arrives: a broker that restarted empty has none, and
            # the registrar's will may have been lost with the old broker.
            self._registrar_online = False
        mesh = self.settings.mesh
        subscriptions = [
            (self._topic(Kind.REPLY, self.node_id), 1),
            (topics.subscription(mesh, Kind.MEMBERS), 1),
            (topics.subscription(mesh, Kind.ROSTER), 1),
            (topics.subscription(mesh, Kind.REGISTRAR), 1),
        ]
        _, conn.sub_mid = conn.client.subscribe(subscriptions)

    def _on_subscribe(self, conn: _Connection, mid: int, reason_codes: list[mqtt.ReasonCode]) -> None:
        if mid != conn.sub_mid:
            return
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("broker refused %s of our subscriptions (ACL?): %s", len(refused), refused)
        conn.subscribed.set()

    def _on_disconnect(self, conn: _Connection, reason_code: mqtt.ReasonCode) -> None:
        conn.lost.set()
        with self._reply_cond:
            self._reply_cond.notify_all()
        # One paho client per connection: stop this one's thread instead of letting paho reconnect it with
        # the old epoch and will. The session thread builds the next connection.
        conn.client.loop_stop()

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = topics.parse(msg.topic)
            if topic.mesh != self.settings.mesh:
                return
            if topic.kind is Kind.REPLY:
                reply = messages.decode(RegisterReply, msg.payload)
                with self._reply_cond:
                    self._replies[reply.request_id] = reply
                    self._reply_cond.notify_all()
            elif topic.kind is Kind.MEMBERS:
                self._on_member(topic.node or "", msg.payload)
            elif topic.kind is Kind.ROSTER:
                roster = messages.decode(Roster, msg.payload, max_size=messages.MAX_ROSTER_PAYLOAD)
                with self._lock:
                    before = self._view.complete()
                    self._view.apply_roster(roster)
                    self._wake_if_new(before)
            elif topic.kind is Kind.REGISTRAR:
                status = messages.decode(RegistrarStatus, msg.payload)
                online = status.state == "online"
                with self._reply_cond:
                    was, self._registrar_online = self._registrar_online, online
                    # A retained status is what we learn on subscribing, not a registrar that just came online.
                    if online and not was and not msg.retain:
                        self._registrar_kicks += 1
                        self._reply_cond.notify_all()
                if was != online:
                    log.info("registrar is %s", status.state, extra=self._self_extra())
        except ContractError as exc:
            log.warning("dropping message on %s: %s", msg.topic, exc)

    def _on_member(self, node_id: str, payload: bytes) -> None:
        record = messages.decode(MemberRecord, payload) if payload else None
        if record is not None and record.node_id != node_id:
            raise ContractError(f"member record for {record.node_id} on the topic of {node_id}")
        with self._lock:
            before = self._view.complete()
            if record is None:
                self._view.apply_tombstone(node_id)
            else:
                self._view.apply_record(record)
                self._known[record.public_key] = record
            self._wake_if_new(before)

    def _wake_if_new(self, before: Membership | None) -> None:
        # Only a new complete membership can change the peers: a message that leaves the view partial (or
        # changes nothing) costs no pass. The event coalesces the rest: the loop reads the newest state.
        if self._view.complete() is not before:
            self._wake_reconcile.set()

    # -- local API --------------------------------------------------------------------------------------
    def handle_local(self, request: LocalRequest) -> LocalResponse:
        """Answer one local API request (called from the local API server's threads)."""
        if request.op == "status":
            return LocalResponse(ok=True, status=self.status())
        if not request.target:
            return LocalResponse(ok=False, error="ping needs a target: a node name or mesh IP")
        try:
            return LocalResponse(ok=True, ping=self.ping(request.target, count=request.count))
        except AgentError as exc:
            return LocalResponse(ok=False, error=str(exc))

    def status(self) -> AgentStatus:
        """This agent and its peers as `meshctl status` shows them."""
        with self._lock:
            membership = self._view.complete() or self._persisted
            records = list(membership.members.values()) if membership else self._view.records()
            registration = self._registration
            revision = self._view.roster_revision
            complete = self._view.is_complete()
            registrar_online = self._registrar_online
        if revision is None and membership is not None:
            revision = membership.revision
        try:
            actual = self.wireguard.read(self.settings.interface).peers
        except WireGuardError:
            actual = {}
        peers = []
        for record in sorted(records, key=lambda r: (r.name, r.node_id)):
            if record.node_id == self.node_id:
                continue
            state = actual.get(record.public_key)
            peers.append(
                PeerView(
                    node_id=record.node_id,
                    name=record.name,
                    mesh_ip=record.mesh_ip,
                    public_key=record.public_key,
                    state=str(record.state),
                    configured=state is not None,
                    endpoint=state.endpoint if state else None,
                    latest_handshake=state.latest_handshake if state else None,
                    rx_bytes=state.rx_bytes if state else 0,
                    tx_bytes=state.tx_bytes if state else 0,
                )
            )
        return AgentStatus(
            node_id=self.node_id,
            name=self.name,
            mesh_ip=registration.mesh_ip if registration else None,
            prefix_len=registration.prefix_len if registration else None,
            interface=self.settings.interface,
            broker_connected=self.broker_connected,
            registrar_online=registrar_online,
            membership_revision=revision or 0,
            membership_complete=complete,
            peers=peers,
            now=self._clock(),
        )

    def ping(self, target: str, *, count: int = 3) -> PingResult:
        """Ping a member by name or mesh IP over the mesh; AgentError if no such member."""
        with self._lock:
            membership = self._view.complete() or self._persisted
            records = list(membership.members.values()) if membership else self._view.records()
        match = next((r for r in records if target in (r.mesh_ip, r.name, r.node_id)), None)
        if match is None:
            raise AgentError(f"no mesh member named or addressed {target!r}")
        rtts = self._pinger.ping(match.mesh_ip, count=count)
        return PingResult(target=target, mesh_ip=match.mesh_ip, rtts_ms=rtts)
