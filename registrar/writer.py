"""The single writer: the one thread that reads the command queue, decides, commits, and publishes.

Every input reaches the registrar as a command in one queue (registrar.commands, registrar.inbox), so MQTT
messages, HTTP calls, ticks and connection events are serialised with each other. The writer takes everything
queued when the inbox wakes it (an active member's heartbeat does not wake it at once: it lingers until
something else does or for registrar.inbox.LINGER_S) and works through it in order. Per round it drains a batch
of messages and decides them one by one with the pure engine, commits the batch (registrar.commit) and only then
makes it visible, handles the one other command that ended the batch, and then does what the clock asks: a liveness
tick (registrar.ticks) and the publication of the membership stream: a signed delta from the last published
revision, and the signed retained snapshot (registrar.publishing decides when, registrar.stream what).

On every (re)connection it revives the members whose last will arrived within `offline_doubt_s` before the
connection was lost (a stopping broker publishes every client's will just before it drops us, so those say
nothing about the nodes), restarts the grace period (while it could not hear heartbeats it must not conclude
that members went silent), then republishes everything (registrar.broker_link.BrokerLink.announce).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace

from meshcontract import topics
from meshcontract.topics import Kind
from registrar import commands, engine, liveness, publishing, ticks
from registrar.batch import Incoming, decide, refresh
from registrar.broker_link import BrokerLink
from registrar.commit import Committed, Committer
from registrar.deadlines import DeadlineQueue
from registrar.errors import StoreError
from registrar.inbox import Inbox
from registrar.membership import Member
from registrar.metrics import Counters
from registrar.store import Store

log = logging.getLogger(__name__)

MAX_BATCH = 256  # messages decided and committed together at most
# How long plain heartbeats' refreshes of last_seen may wait before other threads see them (registrar.batch):
# every decision of the writer applies them first; only readers of the state (the API's last_seen) may lag.
HEARD_FLUSH_S = 0.1


class Writer:
    """The writer's state and loop; `run()` is the thread. Other threads read `state`, `connected`, `checked_at`."""

    def __init__(
        self,
        *,
        state: engine.CoreState,
        config: engine.Config,
        inbox: Inbox,
        store: Store,
        link: BrokerLink,
        committer: Committer,
        counters: Counters,
        publish_policy: publishing.PublishPolicy,
        tick_interval_s: float,
        offline_doubt_s: float,
        ready: threading.Event,
        clock: Callable[[], float],
    ) -> None:
        self.state = state  # an immutable snapshot, swapped atomically: safe to read from any thread
        self.connected = False
        self.checked_at: float | None = None  # `now` of the last liveness check
        self._config = config
        self._inbox = inbox
        self._taken: deque[object] = deque()  # read from the inbox, not handled yet: ahead of whatever it holds
        self._store = store
        self._link = link
        self._committer = committer
        self._counters = counters
        self._publish_policy = publish_policy
        self._tick_s = tick_interval_s
        self._offline_doubt_s = offline_doubt_s
        self._ready = ready
        self._clock = clock  # wall clock: what the state and the messages carry; schedules use time.monotonic()
        self._schedule = publishing.PublishSchedule()
        # Node ids whose record changed (or who left) since the revision agents were last told about: the next
        # delta goes from that revision to the current one and carries exactly these.
        self._pending: set[str] = set()
        self._published_revision = state.membership.revision
        self._tick_waiting_since: float | None = None
        # Who the next tick must look at (instead of every member); told of every committed change in _commit.
        self._deadlines = DeadlineQueue(config.policy)
        self._deadlines.rebuild(state.membership.members, started_at=state.membership.started_at)
        self._lost_at: float | None = None  # when the broker connection was last lost
        # Plain heartbeats' refreshes not yet in `state` (registrar.batch), and since when some are waiting.
        self._heard: Mapping[str, Member] = {}
        self._heard_since: float | None = None

    def run(self) -> None:
        """Serve commands until Stop, then flush and say goodbye to the broker."""
        while True:
            if not self._taken:
                self._taken.extend(self._inbox.take(deadline=self._wake_at()))
            item = self._next()
            batch: list[commands.Message] = []
            # Group commit: a burst of messages is decided one by one but committed in one transaction (one
            # fsync), and only then made visible. Draining stops at the first non-message, kept in order.
            while isinstance(item, commands.Message):
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    item = None  # the rest waits for the next round
                    break
                item = self._next()
            if batch:
                self._guarded(self._handle_messages, batch)
            if isinstance(item, commands.Stop):
                self._shutdown()
                return
            if item is not None:
                self._guarded(self._dispatch, item)
            self._guarded(self._housekeeping, None)

    def _wake_at(self) -> float | None:
        """Until when the inbox may keep the writer waiting (monotonic; None: until something comes)."""
        if self._tick_waiting_since is not None:
            # A waiting tick reads everything queued first, lingering heartbeats included (registrar.ticks).
            return time.monotonic()
        # The publish deadline is this wait, not an APScheduler job: it moves with almost every change, and the
        # prompt publish after a quiet spell must go out in the round of the change itself, not after a hop
        # through another thread and back into the inbox.
        due_at = self._schedule.due_at
        if self._heard_since is not None:
            flush_at = self._heard_since + HEARD_FLUSH_S
            due_at = flush_at if due_at is None else min(due_at, flush_at)
        return due_at

    def _next(self) -> object | None:
        return self._taken.popleft() if self._taken else None

    def _guarded(self, fn: Callable[[object], None], arg: object) -> None:
        try:
            fn(arg)
        # The daemon loop: a bug in one command must not stop the control plane. Log it and go on.
        except Exception as exc:
            self._counters.add("internal_errors")
            log.exception("registrar command failed: %r", arg)
            if isinstance(arg, commands.Call) and not arg.future.done():
                arg.future.set_exception(exc)

    def _housekeeping(self, _: object) -> None:
        waiting = self._tick_waiting_since
        queue_empty = not self._taken and self._inbox.empty()
        if waiting is not None and ticks.run_now(
            waiting, now=time.monotonic(), queue_empty=queue_empty, interval_s=self._tick_s
        ):
            self._tick_waiting_since = None
            if self.connected:
                self._flush_heard()
                # Deaf while disconnected: silence then says nothing about the members.
                now = self._clock()
                ms, policy = self.state.membership, self._config.policy
                due = self._deadlines.due(ms, now=now) if liveness.judging(ms, now=now, policy=policy) else ()
                self._commit([engine.tick(self.state, now=now, config=self._config, candidates=due)])
                self.checked_at = now
        if publishing.due(self._schedule, now=time.monotonic()):
            self._publish()
        if self._heard_since is not None and time.monotonic() >= self._heard_since + HEARD_FLUSH_S:
            self._flush_heard()

    def _flush_heard(self) -> None:
        """Apply the plain heartbeats' refreshes set aside (registrar.batch): before any decision but theirs."""
        if self._heard:
            self.state = refresh(self.state, self._heard)
        self._heard, self._heard_since = {}, None

    def _dispatch(self, item: object) -> None:
        # Messages never get here: a round drains them into its batch.
        if not isinstance(item, commands.Tick | commands.Subscribed):
            self._flush_heard()  # a call or a connection event decides on the members as they are
        if isinstance(item, commands.Tick):
            self._tick_waiting_since = ticks.requested(self._tick_waiting_since, at=item.at)
        elif isinstance(item, commands.Call):
            self._handle_call(item)
        elif isinstance(item, commands.Connected):
            self._handle_connected()
        elif isinstance(item, commands.Subscribed):
            if self.connected:
                self._link.online()
            if not self._ready.is_set():
                self._ready.set()
                log.info("registrar subscribed and serving", extra={"revision": self.state.membership.revision})
        elif isinstance(item, commands.Disconnected):
            if self.connected:
                log.warning("registrar lost the broker connection: %s", item.reason)
                self._lost_at = self._clock()
            self.connected = False

    def _handle_messages(self, batch: list[commands.Message]) -> None:
        incoming = []
        for msg in batch:
            # Only a records topic has a "/members/" level: the rest (nearly all) need not be parsed twice.
            try:
                parsed = topics.parse(msg.topic) if "/members/" in msg.topic else None
            except topics.TopicError:
                parsed = None
            if parsed is not None and parsed.kind is Kind.MEMBERS:
                self._check_retained_record(parsed.node, msg.payload)
                continue
            incoming.append(Incoming(msg.topic, msg.payload, self._clock()))
        self._counters.add("messages", len(batch))
        decided = decide(self.state, incoming, config=self._config, pending=self._heard)
        if decided.outcomes and not self._commit(decided.outcomes, final=decided.state).ok:
            return  # as if the batch never came: its heartbeats too; those set aside before it still wait
        if decided.outcomes or decided.pending:
            # Only plain heartbeats after the last decided message still wait; the rest is in the state now.
            if self._heard_since is None or decided.outcomes:
                self._heard_since = time.monotonic() if decided.pending else None
            self._heard = decided.pending

    def _handle_call(self, call: commands.Call) -> None:
        if call.future.set_running_or_notify_cancel():
            state = self._with_stored_tokens(self.state) if call.refresh_tokens else self.state
            try:
                outcome = call.fn(state, self._clock())
            except ValueError as exc:  # bad admin arguments (e.g. a token ttl <= 0)
                call.future.set_exception(exc)
                return
            call.future.set_result(self._commit([outcome], publish_replies=False).outcomes[0])

    def _with_stored_tokens(self, state: engine.CoreState) -> engine.CoreState:
        # The CLI may add or revoke tokens in the database while we run: adopt the stored table before a
        # decision that needs one. Cheap: the token table is small.
        try:
            loaded = self._store.load_tokens()
        except StoreError as exc:
            log.error("cannot re-read join tokens: %s", exc)
            return state
        return engine.with_tokens(state, {t.id: t for t in loaded})

    def _commit(
        self,
        outcomes: list[engine.Outcome],
        *,
        final: engine.CoreState | None = None,
        publish_replies: bool = True,
    ) -> Committed:
        """Commit, then show (registrar.commit); schedule the records it changed. Returns what was committed."""
        committed = self._committer.commit(self.state, outcomes, final=final, publish_replies=publish_replies)
        self.state = committed.state
        started_at = committed.state.membership.started_at
        for outcome in committed.outcomes:
            if outcome.change.dirty:
                self._deadlines.note(outcome.change.dirty, started_at=started_at)
        for touched in committed.touched:
            self._changed(touched.node_ids, prompt=touched.prompt)
        return committed

    def _check_retained_record(self, node: str | None, payload: bytes) -> None:
        # We are the only publisher on members/+: a non-empty record for a node that is no longer a member is a
        # leftover (e.g. removed while the broker was down, or a restored database) and must be tombstoned.
        if node is None or not payload or node in self.state.membership.members:
            return
        log.info("tombstoning a stale retained record", extra={"node_id": node})
        self._changed((node,), prompt=True)

    def _changed(self, node_ids: tuple[str, ...], *, prompt: bool) -> None:
        self._pending.update(node_ids)
        self._schedule = publishing.changed(
            self._schedule, now=time.monotonic(), prompt=prompt, policy=self._publish_policy
        )

    def _publish(self) -> None:
        self._schedule = publishing.published(self._schedule, now=time.monotonic())
        if not self.connected:
            return  # the next (re)connection publishes what is pending, and the snapshot
        ms = self.state.membership
        self._link.changes(ms, from_revision=self._published_revision, changed=self._pending)
        self._published_revision = ms.revision
        self._pending.clear()
        self._counters.add("membership_publishes")

    def _handle_connected(self) -> None:
        first = not self.connected and not self._ready.is_set()
        self.connected = True
        if self._lost_at is not None:
            # Before republishing: the records that go out must already be the revived ones.
            since, self._lost_at = self._lost_at - self._offline_doubt_s, None
            self._commit([engine.forgive_offline(self.state, since=since, now=self._clock())])
        # Restart the grace period: while disconnected we heard no heartbeat, which proves nothing.
        ms = self.state.membership
        self.state = replace(self.state, membership=replace(ms, started_at=self._clock()))
        self._link.announce(self.state.membership, from_revision=self._published_revision, changed=self._pending)
        self._published_revision = self.state.membership.revision
        self._pending.clear()
        self._counters.add("membership_publishes")
        log.info(
            "registrar %s to the broker, %d member records republished",
            "connected" if first else "reconnected",
            len(ms.members),
            extra={"revision": ms.revision},
        )

    def _shutdown(self) -> None:
        self._flush_heard()
        if self._pending:
            self._publish()
        self._link.goodbye(connected=self.connected)
        self.connected = False
        log.info("registrar stopped")
