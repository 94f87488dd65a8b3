"""The registrar's MQTT side: one writer thread applies every input to the engine, the store, and the broker.

Threads: paho's network loop and the HTTP server only enqueue commands; the writer thread alone reads the queue,
runs the pure engine, commits each Outcome to the store *before* anything becomes visible (reply or record), and
publishes. Member records and the roster are batched over `publish_window_s`, so a burst of registrations or a
tick that marks many members unreachable becomes one roster publish carrying the newest state.

On every (re)connection the writer publishes RegistrarStatus online (its will says offline), republishes every
member record and the roster (a broker restart may have lost retained messages), tombstones retained records of
nodes that are no longer members, subscribes to register/+, status/+, heartbeat/+ and members/+, and restarts
the grace period: while it could not hear heartbeats it must not conclude that members went silent. Before
that it revives members whose last will arrived within `offline_doubt_s` before the connection was lost:
a stopping broker publishes every client's will just before it drops us, so those say nothing about the nodes.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import paho.mqtt.client as mqtt

from meshcontract import access, messages, topics
from meshcontract.messages import ErrorCode, RegistrarStatus, Roster
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings, connect_async, make_client
from registrar import engine, metrics, tokens
from registrar.credentials import Credentials
from registrar.errors import CredentialsError, Refused, StoreError
from registrar.membership import Event
from registrar.store import Store

log = logging.getLogger(__name__)

QOS_RELIABLE = 1
MAX_BATCH = 256  # messages decided and committed together at most
_STOP_PUBLISH_WAIT_S = 3.0


@dataclass(frozen=True, slots=True)
class _Message:
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class _Connected:
    pass


@dataclass(frozen=True, slots=True)
class _Disconnected:
    reason: str


@dataclass(frozen=True, slots=True)
class _Subscribed:
    pass


@dataclass(frozen=True, slots=True)
class _Call:
    """Run `fn(state, now)` -> Outcome in the writer; its result (the Outcome) completes `future`."""

    fn: Callable[[engine.CoreState, float], engine.Outcome]
    future: Future
    refresh_tokens: bool = False


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


class RegistrarService:
    """The running registrar of one mesh. `start()`, then `stop()` (publishes RegistrarStatus offline)."""

    def __init__(
        self,
        *,
        config: engine.Config,
        store: Store,
        broker: BrokerSettings,
        network: str,
        quarantine_s: float,
        credentials: Credentials | None = None,
        publish_window_s: float = 0.2,
        publish_max_delay_s: float = 1.0,
        offline_doubt_s: float = 2.0,
        will_hold_s: float = 0.1,
        tick_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.mesh = config.mesh.mesh
        self._store = store
        self._broker = broker
        self._network = network
        self._quarantine_s = quarantine_s
        self._credentials = credentials
        self._window = publish_window_s
        self._max_delay = publish_max_delay_s
        self._offline_doubt_s = offline_doubt_s
        self._will_hold_s = will_hold_s
        self._lost_at: float | None = None  # when the broker connection was last lost (our clock)
        self._tick_s = tick_interval_s or min(1.0, max(0.05, config.policy.ttl_s / 5))
        self._clock = clock
        self.instance = secrets.token_hex(6)
        self.started_at = clock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._state: engine.CoreState | None = None
        self._pending: set[str] = set()  # node ids whose record (or tombstone) awaits the next flush
        self._roster_due = False
        self._flush_at: float | None = None
        self._first_change_at = 0.0
        self._last_flush_at = float("-inf")
        self._quiet_flush = False  # the pending flush is the prompt first one after a quiet window
        self._next_tick = 0.0
        self._connected = False
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._writer: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._counters = metrics.Counters()
        self._checked_at: float | None = None  # `now` of the last liveness check

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load state, connect (in the background) and start the writer. Returns at once."""
        stored = self._store.load()
        self._state = engine.restore(
            members=stored.members,
            join_tokens=stored.tokens,
            revision=stored.revision,
            quarantine=stored.quarantine,
            network=self._network,
            quarantine_s=self._quarantine_s,
            started_at=self._clock(),
        )
        log.info(
            "registrar state loaded: %d members, revision %d",
            len(self._state.membership.members),
            self._state.membership.revision,
            extra={"revision": self._state.membership.revision},
        )
        client = make_client(self._broker, client_id=f"registrar.{self.mesh}")
        client.will_set(
            topics.build(self.mesh, Kind.REGISTRAR),
            self._status_payload("offline"),
            qos=QOS_RELIABLE,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        # The one client every node waits for after a broker restart (registrations, the roster): retry often
        # instead of paho's default back-off, which left it ~4 s behind the agents after a 3 s outage.
        client.reconnect_delay_set(min_delay=0.25, max_delay=2.0)
        # Do not let paho drop our QoS 1 publishes when a burst fills its in-flight window.
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        self._client = client
        self._writer = threading.Thread(target=self._run, name=f"registrar-writer-{self.mesh}", daemon=True)
        self._writer.start()
        connect_async(client, self._broker)

    def wait_ready(self, timeout: float) -> bool:
        """True once connected and subscribed (the first time); False on timeout."""
        return self._ready.wait(timeout)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Graceful stop: flush, publish RegistrarStatus offline (retained), disconnect, join the writer."""
        if self._writer is None:
            return
        self._queue.put(_Stop())
        self._writer.join(timeout)
        if self._client is not None:
            self._client.loop_stop()
        self._writer = None

    # ---- what others read (thread-safe: the state is an immutable snapshot swapped atomically) -------

    @property
    def state(self) -> engine.CoreState:
        assert self._state is not None, "start() first"
        return self._state

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def counters(self) -> Mapping[str, int]:
        """A snapshot of every counter (registrar.metrics.COUNTERS)."""
        return self._counters.snapshot()

    def token_valid(self, token: str) -> bool:
        """Whether `token` could admit a node now (the embedded broker's join-token login check)."""
        table = {t.id: t for t in self._store.load_tokens()}
        try:
            tokens.check(table, token, now=self._clock())
        except Refused:
            return False
        return True

    # ---- commands from other threads (HTTP API, CLI) --------------------------------------------------

    def call(
        self,
        fn: Callable[[engine.CoreState, float], engine.Outcome],
        *,
        refresh_tokens: bool = False,
        timeout: float = 10.0,
    ) -> engine.Outcome:
        """Run `fn` in the writer like any other input and return its (committed, published) Outcome."""
        future: Future = Future()
        self._queue.put(_Call(fn, future, refresh_tokens))
        return future.result(timeout)

    def register_payload(self, payload: bytes, *, timeout: float = 10.0) -> engine.Outcome:
        """A registration over HTTP: same rules, same writer; the reply comes back instead of being published."""
        config = self.config
        return self.call(
            lambda state, now: engine.register_payload(state, payload, now=now, config=config),
            refresh_tokens=True,
            timeout=timeout,
        )

    # ---- paho callbacks: enqueue only ------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the registrar: %s", reason_code)
            return
        self._queue.put(_Connected())

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._queue.put(_Disconnected(str(reason_code)))

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(_Message(msg.topic, msg.payload))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._queue.put(_Subscribed())

    # ---- the writer ------------------------------------------------------------------------------------

    def _run(self) -> None:
        self._next_tick = time.monotonic() + self._tick_s
        while True:
            wake = self._next_tick if self._flush_at is None else min(self._next_tick, self._flush_at)
            try:
                item = self._queue.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                item = None
            batch: list[_Message] = []
            # Group commit: a burst of messages is decided one by one but committed in one transaction (one
            # fsync), and only then made visible. Draining stops at the first non-message, kept in order.
            while isinstance(item, _Message):
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    item = None  # the rest waits in the queue for the next round
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if batch:
                self._guarded(self._handle_messages, batch)
            if isinstance(item, _Stop):
                self._shutdown()
                return
            if item is not None:
                self._guarded(self._dispatch, item)
            self._guarded(self._housekeeping, None)

    def _guarded(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            fn(arg)
        # The daemon loop: a bug in one command must not stop the control plane. Log it and go on.
        except Exception as exc:
            self._counters.add("internal_errors")
            log.exception("registrar command failed: %r", arg)
            if isinstance(arg, _Call) and not arg.future.done():
                arg.future.set_exception(exc)

    def _housekeeping(self, _: object) -> None:
        now_mono = time.monotonic()
        # Silence is judged only after reading what has arrived: heartbeats still queued behind a slow batch
        # (a long commit) must count before the clock does. Under a flood, one tick interval late at most.
        overdue = now_mono >= self._next_tick + self._tick_s
        if now_mono >= self._next_tick and (overdue or self._queue.empty()):
            self._next_tick = now_mono + self._tick_s
            if self._connected:
                # Deaf while disconnected: silence then says nothing about the members.
                checked_at = self._clock()
                self._commit_and_show([engine.tick(self.state, now=checked_at, config=self.config)])
                self._checked_at = checked_at
        if self._flush_at is not None and now_mono >= self._flush_at:
            self._flush()

    def _dispatch(self, item: object) -> None:
        if isinstance(item, _Message):
            self._handle_messages([item])
        elif isinstance(item, _Call):
            self._handle_call(item)
        elif isinstance(item, _Connected):
            self._handle_connected()
        elif isinstance(item, _Subscribed):
            if not self._ready.is_set():
                self._ready.set()
                log.info(
                    "registrar subscribed and serving", extra={"revision": self.state.membership.revision}
                )
        elif isinstance(item, _Disconnected):
            if self._connected:
                log.warning("registrar lost the broker connection: %s", item.reason)
                self._lost_at = self._clock()
            self._connected = False

    def _handle_messages(self, batch: list[_Message]) -> None:
        state = self.state
        outcomes = []
        for msg in batch:
            self._counters.add("messages")
            try:
                parsed = topics.parse(msg.topic)
            except topics.TopicError:
                parsed = None
            if parsed is not None and parsed.kind is Kind.MEMBERS:
                self._check_retained_record(parsed.node, msg.payload)
                continue
            if (
                parsed is not None
                and parsed.kind is Kind.REGISTER
                and parsed.node not in state.membership.members
            ):
                state = self._with_stored_tokens(state)
            outcome = engine.handle_message(
                state, msg.topic, msg.payload, now=self._clock(), config=self.config
            )
            state = outcome.state
            outcomes.append(outcome)
        self._commit_and_show(outcomes, final=state)

    def _handle_call(self, call: _Call) -> None:
        if call.future.set_running_or_notify_cancel():
            state = self._with_stored_tokens(self.state) if call.refresh_tokens else self.state
            try:
                outcome = call.fn(state, self._clock())
            except ValueError as exc:  # bad admin arguments (e.g. a token ttl <= 0)
                call.future.set_exception(exc)
                return
            call.future.set_result(self._commit_and_show([outcome], publish_reply=False)[0])

    def _with_stored_tokens(self, state: engine.CoreState) -> engine.CoreState:
        # The CLI may add or revoke tokens in the database while we run: adopt the stored table before a
        # decision that needs one. Cheap: the token table is small.
        try:
            loaded = self._store.load_tokens()
        except StoreError as exc:
            log.error("cannot re-read join tokens: %s", exc)
            return state
        return engine.with_tokens(state, {t.id: t for t in loaded})

    def _commit_and_show(
        self,
        outcomes: list[engine.Outcome],
        *,
        final: engine.CoreState | None = None,
        publish_reply: bool = True,
    ) -> list[engine.Outcome]:
        """Commit the outcomes (one transaction), then make them visible. Returns them as applied."""
        for outcome in outcomes:
            node = outcome.node_id or "-"
            if outcome.rejected:
                self._counters.add("rejected")
                log.warning("rejected input: %s", outcome.rejected, extra={"node_id": node})
            elif outcome.ignored:
                self._counters.add("ignored")
                log.debug("ignored input: %s", outcome.ignored, extra={"node_id": node})
        # The node's own password goes into the password file before the membership is committed and long
        # before the reply is published: whatever crashes or gets lost after this point, the node can log in
        # with the password it holds. Failing here commits nothing, so a single-use token is not spent either.
        try:
            self._adopt_passwords(outcomes)
        except CredentialsError as exc:
            log.error("cannot store broker credentials, %d commands dropped: %s", len(outcomes), exc)
            return self._fail(outcomes, "cannot store broker credentials, retry", publish_reply=publish_reply)
        deltas = [o.delta for o in outcomes if not o.delta.is_empty()]
        if deltas:
            try:
                self._store.commit_many(deltas)
            except StoreError as exc:
                # Nothing of these commands happened: the state is not swapped, nodes are told to retry.
                self._counters.add("store_errors")
                log.error("store commit failed, %d commands dropped: %s", len(outcomes), exc)
                return self._fail(outcomes, "registrar storage failure, retry", publish_reply=publish_reply)
        if final is not None:
            self._state = final
        elif outcomes:
            self._state = outcomes[-1].state
        return [self._show(outcome, publish_reply=publish_reply) for outcome in outcomes]

    def _fail(
        self, outcomes: list[engine.Outcome], message: str, *, publish_reply: bool
    ) -> list[engine.Outcome]:
        """Answer every registration of a batch that was not committed with a retryable error."""
        failed = []
        for outcome in outcomes:
            if outcome.reply is not None:
                reply = engine.error_reply(
                    outcome.reply.request_id, outcome.reply.node_id, ErrorCode.INTERNAL, message
                )
                outcome = replace(outcome, state=self.state, reply=reply, delta=engine.Delta())
                if publish_reply:
                    self._publish_reply(outcome)
            failed.append(outcome)
        return failed

    def _adopt_passwords(self, outcomes: list[engine.Outcome]) -> None:
        """Store the own broker password of each node admitted by this batch that has no entry yet.

        Only a registration that admits the node counts (it redeemed a join token): a re-registration of an
        existing member needs no token, and over HTTP its sender proved nothing, so it must not set credentials.
        """
        if self._credentials is None:
            return
        offered = {}
        for o in outcomes:
            if o.broker_password is None or o.reply is None or not o.reply.ok or not o.change.joined:
                continue
            if o.broker_password.startswith(access.JOIN_PASSWORD_PREFIX):
                log.warning("ignoring a broker password shaped like a join token", extra={"node_id": o.node_id})
                continue
            offered[o.reply.node_id] = o.broker_password
        if not offered:
            return
        for node in self._credentials.adopt(offered):
            log.info("broker credentials stored (the node's own password)", extra={"node_id": node})

    def _show(self, outcome: engine.Outcome, *, publish_reply: bool) -> engine.Outcome:
        """Log, schedule record publishes and answer, for one committed outcome."""
        for happened in outcome.change.happened:
            m = happened.member
            log.info(
                "%s (%s)",
                happened.event.value,
                happened.reason,
                extra={
                    "node_id": m.node_id,
                    "node_name": m.name,
                    "mesh_ip": m.mesh_ip,
                    "event": happened.event.name.lower(),
                    "epoch": m.epoch,
                },
            )
            if happened.event is Event.JOINED:
                self._counters.add("joins")
        touched = [m.node_id for m in outcome.published] + [m.node_id for m in outcome.removed]
        if touched:
            self._pending.update(touched)
            self._roster_due = True
            self._schedule_flush(prompt=not outcome.change.doubtful)
        if outcome.reply is not None:
            if outcome.reply.ok:
                self._counters.add("registrations")
                outcome = self._with_credentials(outcome)
            else:
                self._counters.add("registrations_refused")
            if publish_reply:
                self._publish_reply(outcome)
        return outcome

    def _with_credentials(self, outcome: engine.Outcome) -> engine.Outcome:
        reply = outcome.reply
        assert reply is not None
        if self._credentials is None:
            return outcome
        if outcome.broker_password is not None:
            return outcome  # stored before the commit (or the node already had an entry)
        # An older agent sends no password of its own: issue one in the reply, as registrars always did.
        try:
            if self._credentials.has(reply.node_id):
                return outcome
            password = self._credentials.issue(reply.node_id)
        except CredentialsError as exc:
            # The membership is committed; a retry (same key) finds no password entry and issues again.
            log.error("cannot issue broker credentials: %s", exc, extra={"node_id": reply.node_id})
            failed = engine.error_reply(
                reply.request_id, reply.node_id, ErrorCode.INTERNAL, "cannot issue broker credentials, retry"
            )
            return replace(outcome, reply=failed)
        log.info("broker credentials issued", extra={"node_id": reply.node_id})
        return replace(outcome, reply=reply.model_copy(update={"broker_password": password}))

    def _publish_reply(self, outcome: engine.Outcome) -> None:
        if outcome.reply is None or outcome.reply_to is None or self._client is None:
            return
        self._client.publish(
            topics.build(self.mesh, Kind.REPLY, outcome.reply_to),
            messages.encode(outcome.reply),
            qos=QOS_RELIABLE,
        )

    def _check_retained_record(self, node: str | None, payload: bytes) -> None:
        # We are the only publisher on members/+: a non-empty record for a node that is no longer a member is a
        # leftover (e.g. removed while the broker was down, or a restored database) and must be tombstoned.
        if node is None or not payload or node in self.state.membership.members:
            return
        log.info("tombstoning a stale retained record", extra={"node_id": node})
        self._pending.add(node)
        self._roster_due = True
        self._schedule_flush()

    def _schedule_flush(self, *, prompt: bool = True) -> None:
        # A change after a quiet `window` is published at once (a join, a leave or a crash reaches the peers
        # without waiting). Changes that follow within the window are debounced with a cap: published `window`
        # after the last one, but at most `max_delay` after the first. A burst (a fleet registering, a tick
        # marking many unreachable) becomes one roster publish, which matters because every roster goes to every
        # member: its fan-out grows with the square of the mesh.
        # A will waits `will_hold_s` first: if the broker is stopping we lose it within milliseconds, and a record
        # published before that would sit unacknowledged in paho, be re-sent after the reconnection and briefly
        # contradict the will we take back then (see forgive_offline). Changes that come while such a first
        # publish is pending ride along with it.
        now = time.monotonic()
        if self._flush_at is None:
            self._first_change_at = now
            if now - self._last_flush_at >= self._window:
                self._flush_at = now if prompt else now + self._will_hold_s
                self._quiet_flush = True
                return
        if self._quiet_flush:
            return
        self._flush_at = min(now + self._window, self._first_change_at + max(self._max_delay, self._window))

    def _flush(self) -> None:
        self._flush_at = None
        self._quiet_flush = False
        self._last_flush_at = time.monotonic()
        if not self._connected or self._client is None:
            return  # the next (re)connection republishes everything
        members = self.state.membership.members
        for node in sorted(self._pending):
            member = members.get(node)
            if member is not None:
                self._publish(topics.build(self.mesh, Kind.MEMBERS, node), messages.encode(member.record()))
            else:
                self._publish(topics.build(self.mesh, Kind.MEMBERS, node), b"")
                # Its retained status would otherwise linger for every observer.
                self._publish(topics.build(self.mesh, Kind.STATUS, node), b"")
        self._pending.clear()
        if self._roster_due:
            self._publish_roster()

    def _publish_roster(self) -> None:
        self._roster_due = False
        ms = self.state.membership
        roster = Roster(mesh=self.mesh, revision=ms.revision, members=ms.roster(), published_at=self._clock())
        self._publish(topics.build(self.mesh, Kind.ROSTER), messages.encode(roster))
        self._counters.add("roster_publishes")

    def _publish(self, topic: str, payload: bytes) -> None:
        assert self._client is not None
        self._client.publish(topic, payload, qos=QOS_RELIABLE, retain=True)

    def _status_payload(self, state: str) -> bytes:
        return messages.encode(
            RegistrarStatus(state=state, instance=self.instance, started_at=self.started_at, at=self._clock())
        )

    def _handle_connected(self) -> None:
        assert self._client is not None
        first = not self._connected and not self._ready.is_set()
        self._connected = True
        if self._lost_at is not None:
            # Before republishing: the records that go out must already be the revived ones.
            since, self._lost_at = self._lost_at - self._offline_doubt_s, None
            self._commit_and_show([engine.forgive_offline(self.state, since=since, now=self._clock())])
        # Restart the grace period: while disconnected we heard no heartbeat, which proves nothing.
        ms = self.state.membership
        self._state = replace(self.state, membership=replace(ms, started_at=self._clock()))
        self._publish(topics.build(self.mesh, Kind.REGISTRAR), self._status_payload("online"))
        for node in sorted(ms.members):
            self._publish(
                topics.build(self.mesh, Kind.MEMBERS, node), messages.encode(ms.members[node].record())
            )
        self._pending -= set(ms.members)
        self._publish_roster()
        self._client.subscribe(
            [
                (topics.subscription(self.mesh, Kind.REGISTER), QOS_RELIABLE),
                (topics.subscription(self.mesh, Kind.STATUS), QOS_RELIABLE),
                (topics.subscription(self.mesh, Kind.HEARTBEAT), 0),
                (topics.subscription(self.mesh, Kind.MEMBERS), QOS_RELIABLE),
            ]
        )
        log.info(
            "registrar %s to the broker, %d member records republished",
            "connected" if first else "reconnected",
            len(ms.members),
            extra={"revision": ms.revision},
        )

    def _shutdown(self) -> None:
        client = self._client
        if self._pending or self._roster_due:
            self._flush()
        if client is not None and self._connected:
            info = client.publish(
                topics.build(self.mesh, Kind.REGISTRAR),
                self._status_payload("offline"),
                qos=QOS_RELIABLE,
                retain=True,
            )
            try:
                info.wait_for_publish(_STOP_PUBLISH_WAIT_S)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
        if client is not None:
            # Also when not connected: it ends paho's reconnect wait, so loop_stop() returns at once.
            client.disconnect()
        self._connected = False
        self._stopped.set()
        log.info("registrar stopped")

    # ---- metrics -----------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Numbers for /metrics."""
        return metrics.numbers(
            self.state.membership,
            self._counters.snapshot(),
            connected=self._connected,
            liveness_checked_at=self._checked_at,
        )
