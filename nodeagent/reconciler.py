"""The reconcile loop: the only code that changes this node's WireGuard interface, address, link and route.

It applies the newest complete membership (nodeagent.meshstate) with the pure plan of nodeagent.reconcile:
desired peers from membership, actual peers read back from WireGuard, only the difference applied. It runs
when woken (a new complete membership, a registration, the periodic drift repair) and coalesces any number of
wake-ups that arrive during a pass into one more pass over the newest state.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from nodeagent.errors import StateDirError
from nodeagent.identity import Identity
from nodeagent.meshstate import MeshState
from nodeagent.reconcile import DEFAULT_KEEPALIVE_S, desired_peers, plan_reconcile
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Registration, StateStore
from wgctl.errors import WireGuardError
from wgctl.model import RouteBackend, WireGuardBackend

log = logging.getLogger(__name__)


class Reconciler:
    """Brings the interface to the desired state on demand (`wake`) from its own thread (`run`)."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        identity: Identity,
        wireguard: WireGuardBackend,
        routes: RouteBackend,
        mesh: MeshState,
        store: StateStore,
        registration: Callable[[], Registration | None],
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._wireguard = wireguard
        self._routes = routes
        self._mesh = mesh
        self._store = store
        self._registration = registration
        self._wake = threading.Event()
        self._pass_lock = threading.Lock()
        self.passes = 0  # completed passes (tests and status wait on it)
        self.counters: Counter[str] = Counter()  # peer_added / peer_updated / peer_removed / reconcile_failed

    def wake(self) -> None:
        """Ask for a pass over the newest state (cheap; bursts coalesce)."""
        self._wake.set()

    def run(self, stopping: threading.Event) -> None:
        """The loop: one pass per wake-up until `stopping` is set (set it, then `wake()`, to end it)."""
        while True:
            self._wake.wait()
            if stopping.is_set():
                return
            # Clear before reading state: a change that lands while we work sets it again, so the newest
            # state is never missed, and any number of changes during one pass cost one more pass.
            self._wake.clear()
            try:
                self.reconcile_once("wake-up")
            except Exception:  # the daemon loop: log, keep the tunnels, try again on the next wake-up
                self.counters["reconcile_failed"] += 1
                log.exception("reconcile failed; retrying on the next wake-up")

    def _keepalive(self, registration: Registration | None) -> int:
        if self._settings.persistent_keepalive_s is not None:
            return self._settings.persistent_keepalive_s
        if registration is not None:
            return registration.settings.persistent_keepalive_s
        return DEFAULT_KEEPALIVE_S

    def set_identity(self, identity: Identity) -> None:
        """Use `identity` (a rotated key) from the next pass on; the pass sets it on the interface."""
        self._identity = identity

    def _fields(self, registration: Registration | None) -> dict[str, str]:
        return self._identity.log_fields(registration.mesh_ip if registration else None)

    def reconcile_once(self, reason: str) -> None:
        """Bring the interface, its address, link, route and peers to the desired state; apply only changes."""
        with self._pass_lock:
            membership = self._mesh.current()
            registration = self._registration()
            ifname = self._settings.interface
            me = self._identity
            try:
                self._wireguard.ensure_interface(
                    ifname, private_key=me.private_key, listen_port=self._settings.listen_port
                )
                if registration is not None:
                    self._ensure_link(ifname, registration)
                if membership is None:
                    self.passes += 1
                    return  # never seen a complete membership: no opinion on peers, so touch none
                actual = self._wireguard.read(ifname).peers
                desired = desired_peers(
                    membership,
                    self_id=me.node_id,
                    self_public_key=me.public_key,
                    keepalive=self._keepalive(registration),
                )
                plan = plan_reconcile(desired, actual, members_by_key=self._mesh.known_by_key())
                if not plan.changes.is_empty():
                    self._wireguard.apply(ifname, plan.changes)
            except WireGuardError as exc:
                self.counters["reconcile_failed"] += 1
                log.warning(
                    "reconcile (%s) failed, will retry: %s", reason, exc, extra=self._fields(registration)
                )
                return
            self.passes += 1
            for event in plan.events:
                member = event.member
                self.counters[f"peer_{event.kind}"] += 1
                log.info(
                    "peer %s",
                    event.kind,
                    extra={
                        "event": f"peer_{event.kind}",
                        "node_id": member.node_id if member else "?",
                        "node_name": member.name if member else "?",
                        "mesh_ip": member.mesh_ip if member else "?",
                        "peer": event.public_key,
                        "revision": membership.revision,
                    },
                )
            if membership != self._mesh.persisted:
                try:
                    self._store.save_membership(membership)
                except StateDirError as exc:
                    log.error("cannot persist membership: %s", exc)
                    return
                self._mesh.mark_persisted(membership)

    def _ensure_link(self, ifname: str, registration: Registration) -> None:
        fields = self._fields(registration)
        address = f"{registration.mesh_ip}/{registration.prefix_len}"
        if self._routes.ensure_address(ifname, address):
            log.info("address %s set on %s", address, ifname, extra=fields)
        if self._routes.ensure_up(ifname, mtu=registration.settings.mtu):
            log.info("link %s up, mtu %s", ifname, registration.settings.mtu, extra=fields)
        if self._routes.ensure_route(ifname, registration.settings.network):
            log.info("route %s via %s", registration.settings.network, ifname, extra=fields)
