"""The registration exchange: RegisterRequests to the registrar, its signed replies and their verdicts (nodeagent.policy).

Over MQTT on the session's current connection (every new connection registers; changed endpoint candidates
register again) and over HTTPS (nodeagent.registrar_client) for a key the registrar does not hold yet: a key
rotation, or one that a crash or a lost answer left half done. Replies land in a ReplyBox from paho's network
thread (nodeagent.inbound checks their signature first); the exchange waits on it from the session's thread
(registering), the agent's timer (endpoint updates) or the local API's thread (key rotation).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

from meshcontract import messages, topics
from meshcontract.messages import Endpoint, ErrorCode, RegisterReply, RegisterRequest
from meshcontract.topics import Kind
from nodeagent import policy
from nodeagent.connection import Connection
from nodeagent.enrollment import TransientError
from nodeagent.errors import AgentError, RegistrationRefused
from nodeagent.identity import Identity
from nodeagent.registrar_client import RegistrarClient
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Registration, StateStore
from nodeagent.underlay import EndpointSource

log = logging.getLogger(__name__)

Fields = Callable[..., dict[str, object]]  # the session's log fields (node id, name, mesh IP), plus any given


class ReplyBox:
    """The registrar's replies to our requests as they arrive, and whether the registrar is online.

    A registrar that comes online live (not the retained status we learn on subscribing) is a "kick": it just
    restarted and never saw a request sent before, so a wait for a reply ends early and the request goes again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()  # guards everything below
        self._replies: dict[str, RegisterReply] = {}
        self._online = False
        self._kicks = 0

    @property
    def online(self) -> bool:
        with self._cond:
            return self._online

    @property
    def kicks(self) -> int:
        """How often the registrar came online so far (compare two readings: did it in between?)."""
        with self._cond:
            return self._kicks

    def deliver(self, reply: RegisterReply) -> None:
        """A (verified) reply arrived: hand it to whoever waits for its request."""
        with self._cond:
            self._replies[reply.request_id] = reply
            self._cond.notify_all()

    def registrar_status(self, *, online: bool, retained: bool) -> bool:
        """The registrar said it is online or offline; whether it was online before."""
        with self._cond:
            was, self._online = self._online, online
            # A retained status is what we learn on subscribing, not a registrar that just came online.
            if online and not was and not retained:
                self._kicks += 1
                self._cond.notify_all()
        return was

    def forget_registrar(self) -> None:
        """A new connection: whether the registrar is online is unknown until its retained status arrives (a
        broker that restarted empty has none, and the registrar's will may have been lost with the old broker)."""
        with self._cond:
            self._online = False

    def wake(self) -> None:
        """Make every wait look again at its connection (it was lost, or we stop)."""
        with self._cond:
            self._cond.notify_all()

    def wait(
        self, request_id: str, timeout: float, *, lost: threading.Event, kicks_before: int | None = None
    ) -> RegisterReply | None:
        """The reply to `request_id` if it arrives within `timeout`, else None. Returns None early when `lost` is
        set (call `wake()` after setting it) or the registrar comes online (since `kicks_before`, by default since
        now)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            kicks = self._kicks if kicks_before is None else kicks_before
            while request_id not in self._replies and not lost.is_set():
                if self._kicks != kicks:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            reply = self._replies.pop(request_id, None)
            self._replies.clear()  # answers to older requests are of no use any more
            return reply


class RegistrationExchange:
    """Registers this node: on a connection until answered (`register`), again when its endpoint candidates
    change (`update_endpoints`), and a new key over HTTPS (`register_new_key`). Holds no connection of its own:
    each call is handed the session's current one."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        identity: Callable[[], Identity],
        store: StateStore,
        endpoints: EndpointSource,
        registrar: RegistrarClient | None,
        replies: ReplyBox,
        fields: Fields,
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._store = store
        self._endpoints = endpoints
        self._registrar = registrar
        self._replies = replies
        self._fields = fields
        self._lock = threading.Lock()
        self._registered_endpoints: list[Endpoint] | None = None  # what the registrar last confirmed (lock)
        self._reregistering = threading.Lock()  # one re-registration on the current connection at a time

    # -- registering on a connection (the session's thread) ------------------------------------------------
    def register(
        self, conn: Connection, *, endpoints_ready: Callable[[], list[Endpoint]] | None = None
    ) -> Registration | None:
        """Send RegisterRequests on `conn` until one is answered: the registration it granted, or None if the
        connection was lost. RegistrationRefused if the registrar refused us for good. The candidates advertised
        are `endpoints_ready()` (EndpointSource.prepare, started as `conn` connected), else refreshed now.

        Retries back off (with jitter) up to REGISTER_RETRY_CAP_S, but a registrar coming online cuts the wait
        short: it restarted, and answering it quickly keeps us inside its grace period. A late answer to the
        last request, arriving during the backoff, still counts.
        """
        timeout = self._settings.register_timeout_s
        attempt = 0
        endpoints = endpoints_ready() if endpoints_ready is not None else self._endpoints.before_registration()
        kicks = self._replies.kicks
        while not conn.lost.is_set():
            if self._replies.kicks != kicks:
                # The registrar came online since the last request: the backoff grown while it was away says
                # nothing about this one, which is answered quickly or not at all (a lost request).
                attempt = 0
            kicks = self._replies.kicks
            request_id = self._send_register(conn, endpoints=endpoints)
            # A registrar that comes online after this request was sent (live, not the retained status we get
            # on subscribing) never saw it: send it again at once instead of after the timeout.
            reply = self._replies.wait(request_id, timeout, lost=conn.lost, kicks_before=kicks)
            if reply is None and self._replies.kicks != kicks and not conn.lost.is_set():
                log.info("registrar came online; registering again", extra=self._fields())
                continue
            verdict = policy.judge_reply(reply, timeout_s=timeout)
            while verdict.action == "retry":
                if conn.lost.is_set():
                    return None
                delay = policy.backoff_delay(
                    attempt, base=policy.REGISTER_RETRY_BASE_S, cap=policy.REGISTER_RETRY_CAP_S
                )
                attempt += 1
                log.warning(
                    "registration: %s; retrying in %.1fs", verdict.reason, delay, extra=self._fields()
                )
                reply = self._replies.wait(request_id, delay, lost=conn.lost)
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
                return self._granted(reply)
        return None

    def _granted(self, reply: RegisterReply) -> Registration:
        """What an accepted reply grants us; RegistrationRefused if it is not a complete answer for this node."""
        if (
            reply.node_id != self._identity().node_id
            or reply.mesh_ip is None
            or reply.prefix_len is None
            or reply.settings is None
        ):
            raise RegistrationRefused(
                ErrorCode.INVALID_REQUEST.value, f"incomplete registration reply: {reply}"
            )
        return Registration(mesh_ip=reply.mesh_ip, prefix_len=reply.prefix_len, settings=reply.settings)

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

    def _send_register(self, conn: Connection, *, endpoints: list[Endpoint] | None = None) -> str:
        me = self._identity()
        request = self._request(me, epoch=conn.epoch, endpoints=endpoints)
        topic = topics.build(self._settings.mesh, Kind.REGISTER, me.node_id)
        conn.client.publish(topic, messages.encode(request), qos=1)
        log.info("registering (epoch %s)", conn.epoch, extra=self._fields(epoch=conn.epoch))
        return request.request_id

    # -- a new key over HTTPS (the local API's thread, the session's) ------------------------------------
    def register_new_key(self, identity: Identity, *, on_broker: bool) -> bool:
        """Register `identity` (this node with a new key) with the registrar over HTTPS. `on_broker`: whether we
        are registered on the broker right now.

        True if the registrar confirmed it; False if it could not be asked to (or did not answer). AgentError if
        the registrar refused the new key, or it is not safe to ask: no HTTPS door to it, not on the broker, the
        registrar unreachable or no longer accepting our credential.
        """
        if self._registrar is None:
            raise AgentError("no registrar URL known (not enrolled over HTTPS?); the key is unchanged")
        if not on_broker:
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
            return False
        if not reply.ok:
            error = reply.error
            raise AgentError(
                f"the registrar refused the new key ({error.code}: {error.message}); the key is unchanged"
                if error else "the registrar refused the new key; the key is unchanged"
            )
        return True

    def _rekey_over_https(self, conn: Connection) -> policy.Verdict:
        """The registrar holds another key for us (a rotation a crash or a lost answer left half done): register
        ours over HTTPS. The verdict on that answer ("registered" means: register over MQTT again now)."""
        if self._registrar is None:
            return policy.Verdict("fatal", ErrorCode.REKEY_OVER_HTTPS.value,
                                  "the registrar holds another key for this node and no HTTPS door to it is known")  # fmt: skip
        try:
            reply = self._registrar.register(self._request(self._identity(), epoch=conn.epoch))
        except TransientError as exc:
            return policy.Verdict("retry", None, f"registering our key over HTTPS: {exc}")
        verdict = policy.judge_reply(reply, timeout_s=0)
        if verdict.action == "registered":
            log.info("registered our WireGuard key over HTTPS (the registrar held another one)", extra=self._fields())
        return verdict

    # -- endpoint updates (the agent's timer) --------------------------------------------------------------
    def update_endpoints(self, conn: Connection | None, *, registered: bool) -> bool:
        """Register again on `conn` (the current connection; `registered` on it) if the endpoint candidates
        changed since the registrar last confirmed them. True if it confirmed the new ones; False if nothing
        changed, we are not registered with an online registrar now (the next registration carries them), or it
        did not confirm (the next call tries again)."""
        endpoints = self._endpoints.current()
        with self._lock:
            confirmed = self._registered_endpoints
        online = self._replies.online
        if endpoints == confirmed or conn is None or conn.lost.is_set() or not registered or not online:
            return False
        with self._reregistering:
            request_id = self._send_register(conn, endpoints=endpoints)
            reply = self._replies.wait(request_id, self._settings.register_timeout_s, lost=conn.lost)
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
