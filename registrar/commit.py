"""Committing the writer's decisions, then making them visible, in the order every guarantee rests on.

1. An enrolling node's broker account is created first (registrar.accounts), with the password it chose: whatever
   crashes or gets lost after that, the node can log in with the password it holds and retry its enrollment.
   Failing here commits nothing (no token is spent). An account without a member (a crash right after this
   step) is deleted by registrar.accounts.reconcile at the next start.
2. The deltas of a whole batch are committed in one store transaction (group commit: one fsync per burst).
   Failing here drops the batch: the state is not swapped, and every registration in it is told to retry.
3. Only then does anything become visible: events are logged and counted, replies published, removed members'
   broker accounts deleted (their sessions dropped), and the nodes whose records changed handed back to the
   writer, which schedules their publication.

Runs in the writer thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from meshcontract.messages import ErrorCode, RegisterReply
from registrar import engine
from registrar.accounts import BrokerAccounts
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
    ok: bool = True  # False: nothing of the batch was committed (`state` is the one before it)


class Committer:
    """Commits outcomes to `store` (and broker accounts to `accounts`), then shows them; see the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        accounts: BrokerAccounts | None,
        counters: Counters,
        reply: Callable[[str, RegisterReply], None],
    ) -> None:
        self._store = store
        self._accounts = accounts
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
            self._create_accounts(outcomes)
        except CredentialsError as exc:
            log.error("cannot create broker accounts, %d commands dropped: %s", len(outcomes), exc)
            return self._fail(current, outcomes, "cannot create broker accounts, retry", publish_replies)
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
        self._remove_accounts(outcomes)
        return committed

    def _fail(
        self, current: engine.CoreState, outcomes: list[engine.Outcome], message: str, publish_replies: bool
    ) -> Committed:
        """Nothing of the batch happened: answer every registration in it with a retryable error."""
        failed = []
        for outcome in outcomes:
            if outcome.enroll_reply is not None and outcome.enroll_reply.ok:
                refused = engine.enroll_error(outcome.enroll_reply.node_id, ErrorCode.INTERNAL, message)
                outcome = replace(outcome, state=current, enroll_reply=refused, delta=engine.Delta())
            if outcome.reply is not None:
                reply = engine.error_reply(
                    outcome.reply.request_id, outcome.reply.node_id, ErrorCode.INTERNAL, message
                )
                outcome = replace(outcome, state=current, reply=reply, delta=engine.Delta())
                if publish_replies and outcome.reply_to is not None:
                    self._reply(outcome.reply_to, reply)
            failed.append(outcome)
        return Committed(current, failed, ok=False)

    def _create_accounts(self, outcomes: list[engine.Outcome]) -> None:
        """Create the broker accounts of the nodes this batch enrolls (also again for a retried enrollment: an
        account lost on the broker's side is repaired that way)."""
        wanted = {}
        for o in outcomes:
            if o.enroll_reply is not None and o.enroll_reply.ok:
                wanted.update(dict(o.accounts_add))
        if wanted and self._accounts is not None:
            self._accounts.ensure(wanted)
            for node in sorted(wanted):
                log.info("broker account ready (the node's own password)", extra={"node_id": node})

    def _remove_accounts(self, outcomes: list[engine.Outcome]) -> None:
        gone = sorted({node for o in outcomes for node in o.accounts_remove})
        if not gone or self._accounts is None:
            return
        try:
            self._accounts.remove(gone)
        except CredentialsError as exc:
            # Committed already: the accounts are orphans now, and registrar.accounts.reconcile deletes them at
            # the next start. Loud, because a removed node can still log in until then.
            log.error("cannot delete the broker accounts of %s: %s", ", ".join(gone), exc)
            return
        for node in gone:
            log.info("broker account deleted, session dropped", extra={"node_id": node})

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
            else:
                self._counters.add("registrations_refused")
            if publish_replies and outcome.reply_to is not None:
                self._reply(outcome.reply_to, outcome.reply)
        if outcome.enroll_reply is not None:
            self._counters.add("enrollments" if outcome.enroll_reply.ok else "enrollments_refused")
        return outcome
