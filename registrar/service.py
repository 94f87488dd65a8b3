"""The running registrar of one mesh: its threads' lifecycle, and the calls other threads may make.

Threads: the writer (registrar.writer) alone decides, commits and publishes; paho's network thread
(registrar.broker_link), APScheduler's liveness tick, the HTTP API and the CLI only put commands into its
queue (registrar.commands) or read its latest committed snapshot.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from meshcontract import access
from meshcontract.messages import EnrollRequest, MemberState
from meshcontract.signing import Signer
from meshcontract.transport import BrokerSettings
from registrar import accounts as broker_accounts
from registrar import commands, engine, metrics, paths, publishing, ticks
from registrar.accounts import BrokerAccounts
from registrar.broker_link import BrokerLink
from registrar.commit import Committer
from registrar.errors import CredentialsError
from registrar.inbox import LINGER_S, Inbox
from registrar.store import Store
from registrar.writer import Writer

log = logging.getLogger(__name__)

ACCOUNTS_WAIT_S = 5.0  # at start, how long the orphan check waits for the broker's account admin to connect


class RegistrarService:
    """The running registrar of one mesh. `start()`, then `stop()` (publishes RegistrarStatus offline).

    `publish_window_s`, `publish_max_delay_s` and `will_hold_s` shape registrar.publishing's schedule,
    `tick_interval_s` how often liveness is judged (default registrar.ticks.default_interval of the TTL),
    `offline_doubt_s` which wills a reconnection takes back, and `heartbeat_linger_s` how long an active
    member's heartbeat may wait for the writer (registrar.inbox).
    """

    def __init__(
        self,
        *,
        config: engine.Config,
        store: Store,
        broker: BrokerSettings,
        network: str,
        quarantine_s: float,
        signer: Signer,
        accounts: BrokerAccounts | None = None,
        publish_window_s: float = 0.2,
        publish_max_delay_s: float = 1.0,
        offline_doubt_s: float = 2.0,
        will_hold_s: float = 0.1,
        tick_interval_s: float | None = None,
        heartbeat_linger_s: float = LINGER_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.mesh = config.mesh.mesh
        self.instance = secrets.token_hex(6)
        self.started_at = clock()
        self._store = store
        self._network = network
        self._quarantine_s = quarantine_s
        self._clock = clock
        self._offline_doubt_s = offline_doubt_s
        self._tick_s = tick_interval_s or ticks.default_interval(config.policy.ttl_s)
        self._publish_policy = publishing.PublishPolicy(publish_window_s, publish_max_delay_s, will_hold_s)
        self._queue = Inbox(linger_s=heartbeat_linger_s)
        self._counters = metrics.Counters()
        self.signer = signer
        self._accounts = accounts
        self._link = BrokerLink(
            broker,
            mesh=self.mesh,
            instance=self.instance,
            started_at=self.started_at,
            clock=clock,
            inbox=self._queue,
            signer=signer,
            counters=self._counters,
            may_linger=self._heartbeat_may_linger,
        )
        self._committer = Committer(store=store, accounts=accounts, counters=self._counters, reply=self._link.reply)
        self._ready = threading.Event()
        self._writer: Writer | None = None
        self._thread: threading.Thread | None = None
        self._scheduler: BackgroundScheduler | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load state, start the writer and the tick, connect (in the background). Returns at once."""
        stored = self._store.load()
        state = engine.restore(
            members=stored.members,
            join_tokens=stored.tokens,
            revision=stored.revision,
            quarantine=stored.quarantine,
            network=self._network,
            quarantine_s=self._quarantine_s,
            started_at=self._clock(),
            revoked=stored.revoked,
        )
        ms = state.membership
        self._reconcile_accounts(ms.members)
        log.info(
            "registrar state loaded: %d members, revision %d", len(ms.members), ms.revision,
            extra={"revision": ms.revision},
        )  # fmt: skip
        self._writer = Writer(
            state=state,
            config=self.config,
            inbox=self._queue,
            store=self._store,
            link=self._link,
            committer=self._committer,
            counters=self._counters,
            publish_policy=self._publish_policy,
            tick_interval_s=self._tick_s,
            offline_doubt_s=self._offline_doubt_s,
            ready=self._ready,
            clock=self._clock,
        )
        self._thread = threading.Thread(target=self._writer.run, name=f"registrar-writer-{self.mesh}", daemon=True)
        self._thread.start()
        # Scheduling is APScheduler's job, but it only asks: the Tick joins the writer's queue behind every message
        # already there, and the writer decides when it runs (registrar.ticks). One worker: the job only enqueues.
        self._scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)}, daemon=True)
        self._scheduler.add_job(
            self._request_tick,
            "interval",
            seconds=self._tick_s,
            id="liveness-tick",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        self._scheduler.start()
        self._link.start()

    def _reconcile_accounts(self, members) -> None:
        # An enrollment that crashed after its account was created and before its commit leaves an account
        # without a member: no credential may outlive its membership. Mosquitto's admin connects in the
        # background (registrar.runner) and is not up yet when we get here: wait for it, but a broker that is
        # down must not keep the registrar from starting.
        if self._accounts is None:
            return
        if not self._accounts.wait_ready(ACCOUNTS_WAIT_S):
            log.warning(
                "could not check the broker's accounts against the members: no connection to manage them within "
                "%.0f s; accounts without a member keep working until the next start", ACCOUNTS_WAIT_S,
            )  # fmt: skip
            return
        try:
            broker_accounts.reconcile(self._accounts, members)
        except CredentialsError as exc:
            log.warning("could not check the broker's accounts against the members: %s", exc)

    def wait_ready(self, timeout: float) -> bool:
        """True once connected and subscribed (the first time); False on timeout."""
        return self._ready.wait(timeout)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Graceful stop: flush, publish RegistrarStatus offline (retained), disconnect, join the writer."""
        if self._thread is None:
            return
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        self._queue.put(commands.Stop())
        self._thread.join(timeout)
        self._link.close()
        self._thread = None

    def _heartbeat_may_linger(self, node_id: str) -> bool:
        # paho's thread, on the latest committed snapshot (queued commands may change it: this only picks how
        # soon the writer reads the heartbeat, never what it decides). A revival should be published promptly.
        writer = self._writer
        member = writer.state.membership.members.get(node_id) if writer is not None else None
        return member is not None and member.state is MemberState.ACTIVE

    def _request_tick(self) -> None:
        # APScheduler's thread: ask, never decide.
        self._queue.put(commands.Tick(at=time.monotonic()))

    # ---- what others read (the writer's latest committed snapshot) -----------------------------------------

    @property
    def state(self) -> engine.CoreState:
        assert self._writer is not None, "start() first"
        return self._writer.state

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._writer.connected

    @property
    def counters(self) -> Mapping[str, int]:
        """A snapshot of every counter (registrar.metrics.COUNTERS)."""
        return self._counters.snapshot()

    def metrics(self) -> dict[str, float]:
        """Numbers for /metrics."""
        state = self.state
        return metrics.numbers(
            state.membership,
            self._counters.snapshot(),
            path_gauges=paths.summary(state.paths, state.membership),
            connected=self.connected,
            liveness_checked_at=self._writer.checked_at if self._writer is not None else None,
        )

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
        self._queue.put(commands.Call(fn, future, refresh_tokens))
        return future.result(timeout)

    def register_payload(self, payload: bytes, *, node_id: str, timeout: float = 10.0) -> engine.Outcome:
        """A registration over HTTP from the authenticated node `node_id`: same rules, same writer; the reply
        comes back instead of being published."""
        config = self.config
        return self.call(
            lambda state, now: engine.register_payload(state, payload, now=now, config=config, node_id=node_id),
            timeout=timeout,
        )

    def enroll(self, request: EnrollRequest, *, timeout: float = 10.0) -> engine.Outcome:
        """Enroll a node with a join token (HTTPS): decided by the writer like everything else."""
        # Hashing salts with randomness, so it happens here; it is also the slow part, kept off the writer.
        password_hash = access.hash_password(request.password)
        config = self.config
        return self.call(
            lambda state, now: engine.enroll(state, request, now=now, config=config, password_hash=password_hash),
            refresh_tokens=True,
            timeout=timeout,
        )

    def set_service_account(self, username: str, password: str) -> None:
        """Create or re-password the observer's (or the registrar's) broker account. CredentialsError if this
        registrar does not manage the broker's accounts."""
        if self._accounts is None:
            raise CredentialsError("this registrar does not manage the broker's accounts")
        self._accounts.set_service_account(username, password)

    def count(self, key: str) -> None:
        """Count an event another thread saw (registrar.metrics.COUNTERS keys), e.g. the HTTP API's refusals."""
        self._counters.add(key)

    def authenticate(self, node_id: str, password: str) -> bool:
        """Whether `password` is member `node_id`'s credential (checked against the latest committed state)."""
        return engine.authenticate(self.state, node_id, password)
