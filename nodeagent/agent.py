"""The node agent: wires identity, the control-plane session, the reconcile loop and the local API together.

Each part owns one job (nodeagent.session talks to the broker, nodeagent.reconciler changes WireGuard,
nodeagent.meshstate holds what we know of the mesh, nodeagent.localapi_server answers meshctl); this module
starts and stops them in the right order and turns the session's events into work:
  - Registered        -> heartbeats at the mesh's interval, a reconcile pass (address, route, peers)
  - MembershipChanged -> a reconcile pass
  - Refused           -> stop, exit status 3
APScheduler runs the periodic jobs (heartbeats: nodeagent.heartbeats, the drift-repair wake-up of the reconcile
loop, the check of this node's endpoint candidates: nodeagent.underlay). Peers' host names resolve in the background
(nodeagent.resolver), which wakes the reconcile loop when an answer changes.

The agent's view of the mesh only ever shrinks the peer set from a *complete* membership, so a broker restart,
a registrar outage or a half-delivered retained state never tears down a working tunnel.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from apscheduler.schedulers.background import BackgroundScheduler

from meshcontract import localapi
from meshcontract.localapi import AgentStatus, LocalRequest, LocalResponse, PingResult, RotateResult
from meshcontract.signing import Verifier
from meshcontract.transport import BrokerSettings, make_client
from nodeagent import policy
from nodeagent.credentials import BrokerLogin
from nodeagent.enrollment import Waiter, enroll
from nodeagent.errors import AgentError, SettingsError
from nodeagent.greeting import Greeter
from nodeagent.heartbeats import Heartbeats
from nodeagent.identity import Identity, load_identity
from nodeagent.membership import MemberTable
from nodeagent.meshstate import MeshState
from nodeagent.ping import Pinger, SystemPinger
from nodeagent.reconciler import Reconciler
from nodeagent.registrar_client import RegistrarClient
from nodeagent.resolver import Lookup, NameResolver, system_lookup
from nodeagent.session import (
    ClientFactory,
    ControlSession,
    MembershipChanged,
    Refused,
    Registered,
    SessionEvent,
)
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Enrollment, StateStore
from nodeagent.status import agent_status, resolve_target
from nodeagent.underlay import AddressSource, Advertiser, NetlinkAddresses, Reflector, RegistrarReflector
from wgctl.errors import WireGuardError
from wgctl.model import RouteBackend, WireGuardBackend

log = logging.getLogger(__name__)

EXIT_REFUSED = 3
# The registrar no longer knows this node (removed, key revoked, away longer than its reservation): it must
# enroll again with a new join token. The enrollment is forgotten, so the next start does exactly that.
EXIT_IDENTITY_GONE = 4


ENDPOINT_CHECK_S = 3.0  # how often the agent looks for a change of its own addresses (at most)

class Agent:
    """The node daemon. `start()` returns at once; `wait()` blocks until a stop or a fatal refusal; `stop()`.

    Backends are injected so tests can run several agents in one process on in-memory WireGuard:
    `Agent(settings, wireguard=InMemoryWireGuard(), routes=InMemoryRoutes(wg))`. `client_factory` makes the
    paho client of each broker connection (tests inject faults through it). The underlay is injected the same
    way: `addresses` (default: the kernel's interface addresses), `reflector` (default: the registrar's
    GET /v1/reflect), `lookup` (default: the system resolver).
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
        client_factory: ClientFactory = make_client,
        addresses: AddressSource | None = None,
        reflector: Reflector | None = None,
        lookup: Lookup = system_lookup,
    ) -> None:
        self.settings = settings
        self.wireguard = wireguard
        self.routes = routes
        self._clock = clock
        self._pinger = pinger or SystemPinger()
        self._local_api_enabled = local_api
        self._hostname = hostname
        self._client_factory = client_factory
        self._addresses = addresses or NetlinkAddresses()
        self._reflector = reflector
        self._lookup = lookup
        self._advertiser: Advertiser | None = None
        self._resolver: NameResolver | None = None
        self.store = StateStore(settings.state_dir)
        self.identity = Identity(node_id="", name="")
        self.mesh = MeshState()
        self.counters: Counter[str] = Counter()
        self.exit_code = 0
        self.failure: AgentError | None = None
        self._finished = threading.Event()
        self._stopping = threading.Event()
        self._session: ControlSession | None = None
        self._reconciler: Reconciler | None = None
        self._greeter: Greeter | None = None
        self._reconcile_thread: threading.Thread | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._heartbeats: Heartbeats | None = None
        self._api = None
        self.enrollment: Enrollment | None = None
        self._rotating = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self, *, stop: Waiter | None = None) -> None:
        """Enroll if this node never did, load identity and persisted state, restore the mesh from it, then start
        talking to the broker. Enrolling retries until it succeeds or `stop` (default: `request_stop()`) says so.

        Raises EnrollmentRefused (exit 3), AgentError (SettingsError, StateDirError) or ContractError (a malformed
        URL) for problems no retry can fix, and WireGuardError if the backend cannot be used at all.
        """
        settings = self.settings
        if settings.broker is not None:
            settings.broker.host_port()  # a malformed broker URL is a start-up error, not a retry loop
        self.identity = me = load_identity(settings, self.store, hostname=self._hostname)
        enrollment = self.store.enrollment()
        registrar_url = settings.registrar_url or (enrollment.registrar_url if enrollment else None)
        reflector = self._reflector
        if reflector is None and registrar_url:
            reflector = RegistrarReflector(registrar_url, ca_file=self.store.ca_file)
        self._advertiser = advertiser = Advertiser(
            public=me.endpoint, listen_port=settings.listen_port, interface=settings.interface,
            addresses=self._addresses, reflector=reflector,
        )  # fmt: skip
        advertiser.refresh(reflect=False)  # the registrar is asked before each registration (its CA is known then)
        if enrollment is None or enrollment.node_id != me.node_id or enrollment.mesh != settings.mesh:
            # Before anything exists on this machine: a refused join leaves no interface and no process behind.
            enrollment = enroll(
                settings, me, store=self.store, stop=stop or self._finished, endpoints=advertiser.current()
            )
            if enrollment is None:
                return  # asked to stop while enrolling
        self.enrollment = enrollment
        login = BrokerLogin(broker=self._broker_settings(enrollment), store=self.store, node_id=me.node_id)
        registration = self.store.registration()
        persisted = self.store.membership()
        self.mesh = MeshState(persisted)
        log.info(
            "agent starting: interface %s, endpoint candidates %s, %s persisted members",
            settings.interface,
            ", ".join(map(str, advertiser.current())) or "none yet",
            len(persisted.members) if persisted else "no",
            extra=me.log_fields(registration.mesh_ip if registration else None),
        )
        self._session = ControlSession(
            settings,
            identity=me,
            store=self.store,
            login=login,
            mesh=self.mesh,
            verifier=Verifier(enrollment.signing_key),
            registration=registration,
            registrar=self._registrar_client(enrollment),
            on_event=self._on_session_event,
            clock=self._clock,
            client_factory=self._client_factory,
            endpoints=advertiser,
        )
        self._resolver = NameResolver(lookup=self._lookup, on_change=self._wake_reconcile)
        self._greeter = Greeter(settings.interface)
        self._reconciler = Reconciler(
            settings,
            identity=me,
            wireguard=self.wireguard,
            routes=self.routes,
            mesh=self.mesh,
            store=self.store,
            registration=lambda: self._session.registration if self._session else None,
            resolver=self._resolver,
            own_reflexive=lambda: advertiser.reflected,
            greet=self._greeter.greet,
            clock=self._clock,
        )
        # The interface itself must be usable (a permanent backend error ends start-up with a clear message),
        # and it is restored before the broker is reachable: an agent restarted during a control-plane outage
        # brings its tunnels back from the persisted membership.
        self.wireguard.ensure_interface(
            settings.interface, private_key=me.private_key, listen_port=settings.listen_port
        )
        self._reconciler.reconcile_once("startup")

        self._heartbeats = Heartbeats(
            session=self._session, mesh=self.mesh, wireguard=self.wireguard, interface=settings.interface,
            identity=lambda: self.identity, pinger=self._pinger, clock=self._clock, fields=self._fields,
        )  # fmt: skip
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(
            self._reconciler.wake,
            "interval",
            seconds=settings.reconcile_interval_s,
            id="drift-repair",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.add_job(
            self._check_endpoints,
            "interval",
            # A roam is noticed here (the resend of endpoints, a new registration), so more often than the drift
            # repair; reading the addresses is one rtnetlink dump (~0.5 ms).
            seconds=min(settings.reconcile_interval_s, ENDPOINT_CHECK_S),
            id="endpoints",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.start()
        if registration is not None:
            # Heartbeat from the first connection on, as an agent that merely reconnected does: a registrar that
            # comes back after us must not find us silent while our registration waits for its answer.
            self._schedule_heartbeats(registration.settings.heartbeat_interval_s)
        if self._local_api_enabled:
            from nodeagent.localapi_server import LocalApiServer

            self._api = LocalApiServer(
                settings.socket_path,
                self.handle_local,
                mode=settings.socket_mode,
                group=settings.socket_group,
            )
            self._api.start()
        self._reconcile_thread = threading.Thread(
            target=self._reconciler.run,
            args=(self._stopping,),
            name=f"agent-reconcile-{me.node_id}",
            daemon=True,
        )
        self._reconcile_thread.start()
        self._session.start()

    def _registrar_client(self, enrollment: Enrollment) -> RegistrarClient | None:
        """The HTTPS door to the registrar (key rotation, identity checks), with the CA saved at enrollment."""
        url = self.settings.registrar_url or enrollment.registrar_url
        if not url or not self.store.ca_file.exists():
            return None
        return RegistrarClient(url, ca_pem=self.store.ca_file.read_text(), node_id=self.identity.node_id,
                               password=self.store.own_broker_password())  # fmt: skip

    def _broker_settings(self, enrollment: Enrollment) -> BrokerSettings:
        """The configured broker, else the one enrollment named; TLS verified against the mesh's CA."""
        broker = self.settings.broker
        if broker is None:
            if not enrollment.broker_url:
                raise SettingsError("the registrar named no broker: configure broker.url (--broker)")
            broker = BrokerSettings(url=enrollment.broker_url)
        if broker.ca_file is None and broker.host_port()[2]:
            broker = broker.model_copy(update={"ca_file": str(self.store.ca_file), "verify_hostname": False})
        return broker

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
        if self._session is not None:
            self._session.stop()
        if self._reconciler is not None:
            self._reconciler.wake()
        if self._reconcile_thread is not None:
            self._reconcile_thread.join(timeout=10)
            self._reconcile_thread = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._heartbeats is not None:
            self._heartbeats.close()
        if self._resolver is not None:
            self._resolver.close()
        if self._greeter is not None:
            self._greeter.close()
        if self._api is not None:
            self._api.stop()
            self._api = None
        if not self.settings.keep_interface_on_stop:
            self.wireguard.delete_interface(self.settings.interface)
            log.info("interface %s deleted", self.settings.interface, extra=self._fields())
        log.info("agent stopped", extra=self._fields())

    # -- session events (paho's or the session's thread: do not block) ----------------------------------
    def _on_session_event(self, event: SessionEvent) -> None:
        if isinstance(event, Registered):
            self.counters["registrations"] += 1
            if self._heartbeats is not None:
                self._heartbeats.forget_report()
            self._schedule_heartbeats(event.registration.settings.heartbeat_interval_s)
            self._wake_reconcile()
        elif isinstance(event, MembershipChanged):
            self._wake_reconcile()
            if self._heartbeats is not None:
                # Off paho's thread: reading WireGuard and starting probes of members just lost.
                self._heartbeats.probe_lost_soon()
        elif isinstance(event, Refused):
            self.failure = event.error
            self.exit_code = EXIT_REFUSED
            if policy.identity_gone(event.error.code):
                self.exit_code = EXIT_IDENTITY_GONE
                self.store.forget_enrollment()
            self._finished.set()

    def _check_endpoints(self) -> None:
        """The timer's check of our endpoint candidates: re-register on the current connection if they changed
        (a new address, a new NAT) or the registrar has not confirmed them yet."""
        if self._advertiser is None or self._session is None:
            return
        moves = self._advertiser.moves
        self._advertiser.refresh()
        if self._advertiser.moves != moves and self._reconciler is not None:
            self._reconciler.resend_endpoints()
        self._session.update_endpoints()

    def _wake_reconcile(self) -> None:
        if self._reconciler is not None:
            self._reconciler.wake()

    def _schedule_heartbeats(self, interval_s: float) -> None:
        heartbeats = self._heartbeats
        if heartbeats is None:
            return
        heartbeats.interval_s = interval_s
        if self._scheduler is not None:
            self._scheduler.add_job(
                heartbeats.beat,
                "interval",
                seconds=interval_s,
                id="heartbeat",
                replace_existing=True,
                max_instances=1,
                coalesce=True,
            )

    # -- state for callers ------------------------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def public_key(self) -> str:
        return self.identity.public_key

    @property
    def mesh_ip(self) -> str | None:
        registration = self._session.registration if self._session else None
        return registration.mesh_ip if registration else None

    @property
    def broker_connected(self) -> bool:
        return self._session is not None and self._session.connected

    @property
    def registered(self) -> threading.Event:
        """Set after each successful registration, cleared when the connection is lost."""
        assert self._session is not None, "start() first"
        return self._session.registered

    @property
    def reconcile_count(self) -> int:
        """Completed reconcile passes since start."""
        return self._reconciler.passes if self._reconciler else 0

    def membership(self) -> MemberTable | None:
        """The membership reconcile works from: the newest complete view, else the persisted one."""
        return self.mesh.current()

    def _fields(self) -> dict[str, str]:
        return self.identity.log_fields(self.mesh_ip)

    # -- local API --------------------------------------------------------------------------------------
    def handle_local(self, request: LocalRequest, *, caller_uid: int | None) -> LocalResponse:
        """Answer one local API request (called from the local API server's threads) from a process running as
        `caller_uid`: an op that changes the node is refused unless it is root or our own user."""
        refused = localapi.refusal(request.op, caller_uid=caller_uid, agent_uid=os.getuid())
        if refused is not None:
            log.warning("refused %s from uid %s on the local API", request.op, caller_uid, extra=self._fields())
            return LocalResponse(ok=False, error=refused)
        if request.op == "status":
            return LocalResponse(ok=True, status=self.status())
        if request.op == "rotate-key":
            try:
                return LocalResponse(ok=True, rotated=self.rotate_key())
            except AgentError as exc:
                return LocalResponse(ok=False, error=str(exc))
        if not request.target:
            return LocalResponse(ok=False, error="ping needs a target: a node name or mesh IP")
        try:
            return LocalResponse(ok=True, ping=self.ping(request.target, count=request.count))
        except AgentError as exc:
            return LocalResponse(ok=False, error=str(exc))

    def rotate_key(self) -> RotateResult:
        """A new WireGuard key pair for this node, same node id and mesh IP; peers swap the key on the next delta.

        The key file is replaced before the registrar is asked, and put back if it refuses: whatever the file
        holds after a crash, the next registration (authenticated by our broker credential) makes it the mesh's
        key. AgentError, leaving the old key in place, if the control plane is not reachable or refuses.
        """
        from wgctl import keys  # local: keeps module import light for meshctl

        if self._session is None or self._reconciler is None:
            raise AgentError("the agent is not running")
        with self._rotating:
            old = self.identity
            private_key = keys.generate_private_key()
            new = replace(old, private_key=private_key, public_key=keys.public_key(private_key))
            self.store.replace_private_key(private_key)
            try:
                confirmed = self._session.rotate_key(new)
            except AgentError:
                self.store.replace_private_key(old.private_key)
                raise
            self.identity = new
            self._reconciler.set_identity(new)
            # Now, not at the next wake-up: until the interface has the new key, no peer that already swapped
            # can reach us.
            self._reconciler.reconcile_once("key rotated")
            self.counters["key_rotations"] += 1
            log.info("rotated the WireGuard key (was %s)", old.public_key, extra=self._fields())
            return RotateResult(
                previous_public_key=old.public_key, public_key=new.public_key, mesh_ip=self.mesh_ip,
                confirmed=confirmed,
            )  # fmt: skip

    def status(self) -> AgentStatus:
        """This agent and its peers as `meshctl status` shows them."""
        session = self._session
        revision, complete = self.mesh.view_status()
        try:
            actual = self.wireguard.read(self.settings.interface).peers
        except WireGuardError:
            actual = {}
        counters = Counter(self.counters)
        if self._reconciler is not None:
            counters.update(self._reconciler.counters)
            counters["reconcile_passes"] = self._reconciler.passes
        if self._session is not None:
            counters["identity_checks"] = self._session.identity_checks
        return agent_status(
            identity=self.identity,
            interface=self.settings.interface,
            registration=session.registration if session else None,
            records=self.mesh.display_records(),
            actual=actual,
            broker_connected=self.broker_connected,
            registrar_online=session.registrar_online if session else False,
            registered=session is not None and session.registered.is_set(),
            revision=revision,
            complete=complete,
            counters=counters,
            now=self._clock(),
            problems=self._reconciler.problems() if self._reconciler else {},
        )

    def ping(self, target: str, *, count: int = 3) -> PingResult:
        """Ping a member by name or mesh IP over the mesh; AgentError if no such member."""
        records = [r for r in self.mesh.display_records() if r.node_id != self.identity.node_id]
        match = resolve_target(records, target)
        rtts = self._pinger.ping(match.mesh_ip, count=count)
        return PingResult(target=target, mesh_ip=match.mesh_ip, rtts_ms=rtts)
