"""Committing the writer's decisions, then making them visible, in the order every guarantee rests on.

1. A joining node's own broker password goes into the password file first: whatever crashes or gets lost after
   that, the node can log in with the password it holds. Failing here commits nothing (no token is spent).
2. The deltas of a whole batch are committed in one store transaction (group commit: one fsync per burst).
   Failing here drops the batch: the state is not swapped, and every registration in it is told to retry.
3. Only then does anything become visible: events are logged and counted, replies published, and the nodes
   whose records changed handed back to the writer, which schedules their publication.

Runs in the writer thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from meshcontract import access
from meshcontract.messages import ErrorCode, RegisterReply
from registrar import engine
from registrar.credentials import Credentials
from registrar.errors import CredentialsError, StoreError
from registrar.membership import Event
from registrar.metrics import Counters
from registrar.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Touched:
    """Nodes whose retained record (or tombstone) must be published, and whether at once (False: only a will)."""

    node_ids: tuple[str, ...]
    prompt: bool


@dataclass(slots=True)
class Committed:
    """What a commit made of a batch."""

    state: engine.CoreState  # the state to adopt: the new one, or the old one if nothing was committed
    outcomes: list[engine.Outcome]  # as applied: a failed registration carries its error reply
    touched: list[Touched] = field(default_factory=list)  # in the order the outcomes changed them


class Committer:
    """Commits outcomes to `store` (and passwords to `credentials`), then shows them; see the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        credentials: Credentials | None,
        counters: Counters,
        reply: Callable[[str, RegisterReply], None],
    ) -> None:
        self._store = store
        self._credentials = credentials
        self._counters = counters
        self._reply = reply

    def commit(
        self,
        current: engine.CoreState,
        outcomes: list[engine.Outcome],
        *,
        final: engine.CoreState | None = None,
        publish_replies: bool = True,
    ) -> Committed:
        """Commit `outcomes` (decided one after another from `current`; `final` is the last state) and show them."""
        for outcome in outcomes:
            node = outcome.node_id or "-"
            if outcome.rejected:
                self._counters.add("rejected")
                log.warning("rejected input: %s", outcome.rejected, extra={"node_id": node})
            elif outcome.ignored:
                self._counters.add("ignored")
                log.debug("ignored input: %s", outcome.ignored, extra={"node_id": node})
        try:
            self._adopt_passwords(outcomes)
        except CredentialsError as exc:
            log.error("cannot store broker credentials, %d commands dropped: %s", len(outcomes), exc)
            return self._fail(current, outcomes, "cannot store broker credentials, retry", publish_replies)
        deltas = [o.delta for o in outcomes if not o.delta.is_empty()]
        if deltas:
            try:
                self._store.commit_many(deltas)
            except StoreError as exc:
                self._counters.add("store_errors")
                log.error("store commit failed, %d commands dropped: %s", len(outcomes), exc)
                return self._fail(current, outcomes, "registrar storage failure, retry", publish_replies)
        state = final if final is not None else outcomes[-1].state if outcomes else current
        committed = Committed(state, [])
        for outcome in outcomes:
            committed.outcomes.append(self._show(outcome, committed.touched, publish_replies))
        return committed

    def _fail(
        self, current: engine.CoreState, outcomes: list[engine.Outcome], message: str, publish_replies: bool
    ) -> Committed:
        """Nothing of the batch happened: answer every registration in it with a retryable error."""
        failed = []
        for outcome in outcomes:
            if outcome.reply is not None:
                reply = engine.error_reply(
                    outcome.reply.request_id, outcome.reply.node_id, ErrorCode.INTERNAL, message
                )
                outcome = replace(outcome, state=current, reply=reply, delta=engine.Delta())
                if publish_replies and outcome.reply_to is not None:
                    self._reply(outcome.reply_to, reply)
            failed.append(outcome)
        return Committed(current, failed)

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

    def _show(self, outcome: engine.Outcome, touched: list[Touched], publish_replies: bool) -> engine.Outcome:
        """Log and count the events of one committed outcome, note what to publish, answer it."""
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
        nodes = tuple(m.node_id for m in outcome.published) + tuple(m.node_id for m in outcome.removed)
        if nodes:
            touched.append(Touched(nodes, prompt=not outcome.change.doubtful))
        if outcome.reply is not None:
            if outcome.reply.ok:
                self._counters.add("registrations")
                outcome = self._with_credentials(outcome)
            else:
                self._counters.add("registrations_refused")
            if publish_replies and outcome.reply_to is not None:
                self._reply(outcome.reply_to, outcome.reply)
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
