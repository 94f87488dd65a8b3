"""The reconcile loop: the only code that changes this node's WireGuard interface, address, link and route.

It applies the newest complete membership (nodeagent.meshstate) with the pure plan of nodeagent.reconcile:
desired peers from membership, actual peers read back from WireGuard, only the difference applied. It runs
when woken (a new complete membership, a registration, the periodic drift repair, a resolved host name) or when
an endpoint trial ends (nodeagent.endpoints), and coalesces any number of wake-ups that arrive during a pass into
one more pass over the newest state.

One bad record never stops the rest: records that cannot be configured are skipped (nodeagent.reconcile), and a
batch WireGuard refuses is applied again peer by peer, so only the peer it refuses is left out. A peer that starts
or stops being skipped is logged once (`peer_skipped` / `peer_unskipped`) and counted (`peer_skipped`); its
reason is in `problems()` (meshctl status).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping

from meshcontract.messages import MemberRecord
from nodeagent.endpoints import Heard, Listed, Trial, hearing, host_names
from nodeagent.errors import StateDirError
from nodeagent.identity import Identity
from nodeagent.meshstate import MeshState
from nodeagent.reconcile import DEFAULT_KEEPALIVE_S, desired_state, plan_reconcile, with_endpoints_resent
from nodeagent.resolver import NameResolver, Resolutions
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Registration, StateStore
from wgctl.errors import InterfaceNotFoundError, WireGuardError
from wgctl.model import PeerChanges, RouteBackend, WireGuardBackend

log = logging.getLogger(__name__)

_MAX_TRIAL_WAIT_S = 60.0


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
        resolver: NameResolver | None = None,
        own_reflexive: Callable[[], str | None] = lambda: None,
        greet: Callable[[list[str]], object] = lambda ips: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._wireguard = wireguard
        self._routes = routes
        self._mesh = mesh
        self._store = store
        self._registration = registration
        self._resolver = resolver
        self._own_reflexive = own_reflexive
        self._greet = greet  # mesh IPs of the peers a pass added (nodeagent.greeting)
        self._clock = clock
        self._wake = threading.Event()
        self._pass_lock = threading.Lock()
        self.passes = 0  # completed passes (tests and status wait on it)
        # peer_added / peer_updated / peer_removed / peer_skipped / reconcile_failed
        self.counters: Counter[str] = Counter()
        self._trials: dict[str, Trial] = {}  # public key -> endpoint trial, kept between passes
        self._heard: dict[str, Heard] = {}  # public key -> since when its received bytes stand still
        self._listed: dict[str, Listed] = {}  # public key -> its candidates, and when they last changed
        self._resend_endpoints = False  # our address changed: set every peer's endpoint again (with_endpoints_resent)  # public key -> since when its received bytes stand still
        self._next_at: float | None = None  # when the earliest trial ends
        self._refused: set[str] = set()  # public keys WireGuard refused last time: applied on their own
        self._skipped: dict[str, str] = {}  # node id -> why its record is not configured
        self._notes: dict[str, str] = {}  # node id -> a problem of a configured peer

    def resend_endpoints(self) -> None:
        """Our own address changed (a roam): the next pass sets every peer's endpoint again."""
        self._resend_endpoints = True
        self.wake()

    def wake(self) -> None:
        """Ask for a pass over the newest state (cheap; bursts coalesce)."""
        self._wake.set()

    def run(self, stopping: threading.Event) -> None:
        """The loop: one pass per wake-up until `stopping` is set (set it, then `wake()`, to end it)."""
        while True:
            self._wake.wait(self._until_trial_ends())
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

    def _until_trial_ends(self) -> float | None:
        # An endpoint trial that ends needs a pass then, not at the next drift repair (up to 10 s later).
        next_at = self._next_at
        if next_at is None:
            return None
        return min(_MAX_TRIAL_WAIT_S, max(0.05, next_at - self._clock()))

    def problems(self) -> dict[str, str]:
        """node id -> what is wrong with that peer now: why it is skipped, or a problem it is configured with."""
        skipped, notes = self._skipped, self._notes  # replaced whole by each pass, never changed in place
        return {**notes, **{node: f"not configured: {why}" for node, why in skipped.items()}}

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
            resend = False
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
                now = self._clock()
                self._heard = hearing(self._heard, actual, now=now)
                names = host_names(r for r in membership.tunnelled() if r.node_id != me.node_id)
                resolutions = self._resolver.lookup(names) if self._resolver and names else Resolutions()
                desired = desired_state(
                    membership,
                    self_id=me.node_id,
                    self_public_key=me.public_key,
                    self_mesh_ip=registration.mesh_ip if registration else None,
                    keepalive=self._keepalive(registration),
                    actual=actual,
                    trials=self._trials,
                    resolved=resolutions.addresses,
                    failed=resolutions.failed,
                    own_reflexive=self._own_reflexive(),
                    now=now,
                    heard=self._heard,
                    listed=self._listed,
                )
                self._trials, self._next_at, self._listed = desired.trials, desired.next_at, desired.listed
                known = self._mesh.known_by_key()
                plan = plan_reconcile(desired.peers, actual, members_by_key=known)
                changes = plan.changes
                resend, self._resend_endpoints = self._resend_endpoints, False
                if resend:
                    changes = with_endpoints_resent(changes, desired.peers, actual)
                    log.info("our address changed: setting %d peers' endpoints again",
                             len(changes.upsert) - len(plan.changes.upsert), extra=self._fields(registration))
                refused = self._apply(ifname, changes)
            except WireGuardError as exc:
                if resend:
                    self._resend_endpoints = True  # still owed: the next pass tries again
                self.counters["reconcile_failed"] += 1
                log.warning(
                    "reconcile (%s) failed, will retry: %s", reason, exc, extra=self._fields(registration)
                )
                return
            self.passes += 1
            skipped = dict(desired.skipped)
            for key, why in refused.items():
                member = known.get(key)
                if member is not None:
                    skipped[member.node_id] = f"WireGuard refused it: {why}"
            self._report(skipped, desired.notes, membership.members)
            added = [e.member.mesh_ip for e in plan.events
                     if e.kind == "added" and e.member is not None and e.public_key not in refused]
            if added:
                self._greet(added)
            for event in plan.events:
                if event.public_key in refused:
                    continue
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

    def _apply(self, ifname: str, changes: PeerChanges) -> dict[str, str]:
        """Apply `changes`; a batch WireGuard refuses is applied peer by peer. Public key -> why, for the peers it
        refused (peers it refused last time are applied on their own from the start, so they cost one request
        each, not a failed batch every pass). WireGuardError if nothing could be applied at all."""
        if changes.is_empty():
            self._refused = set()
            return {}
        suspect = self._refused

        def singles(keep: Callable[[str], bool]) -> list[PeerChanges]:
            return [PeerChanges(upsert=(p,)) for p in changes.upsert if keep(p.public_key)] + [
                PeerChanges(remove=(k,)) for k in changes.remove if keep(k)
            ]

        alone = singles(lambda key: key in suspect)
        batch = PeerChanges(
            upsert=tuple(p for p in changes.upsert if p.public_key not in suspect),
            remove=tuple(k for k in changes.remove if k not in suspect),
        )
        try:
            if not batch.is_empty():
                self._wireguard.apply(ifname, batch)
        except InterfaceNotFoundError:
            raise
        except WireGuardError as exc:
            log.warning("WireGuard refused %d peer changes at once (%s); applying them one by one",
                        len(batch.upsert) + len(batch.remove), exc)  # fmt: skip
            alone = singles(lambda key: True)
        refused: dict[str, str] = {}
        last: WireGuardError | None = None
        for single in alone:
            try:
                self._wireguard.apply(ifname, single)
            except InterfaceNotFoundError:
                raise
            except WireGuardError as exc:
                key = single.upsert[0].public_key if single.upsert else single.remove[0]
                refused[key], last = str(exc), exc
        if last is not None and len(alone) > 1 and len(refused) == len(alone):
            raise last  # every peer refused on its own: the backend is the problem, not one record
        self._refused = set(refused)
        return refused

    def _report(self, skipped: dict[str, str], notes: dict[str, str], members: Mapping[str, MemberRecord]) -> None:
        """Log and count the peers that start or stop being skipped (not every pass); keep the reasons."""
        for node, why in sorted(skipped.items()):
            if self._skipped.get(node) == why:
                continue
            if node not in self._skipped:
                self.counters["peer_skipped"] += 1
            log.warning("peer skipped: %s", why, extra=_member_fields(node, members, "peer_skipped"))
        for node in sorted(self._skipped.keys() - skipped.keys()):
            log.info("peer no longer skipped", extra=_member_fields(node, members, "peer_unskipped"))
        for node, note in sorted(notes.items()):
            if self._notes.get(node) != note:
                log.info("peer configured with a problem: %s", note, extra=_member_fields(node, members, "peer_problem"))
        self._skipped, self._notes = skipped, notes

    def _ensure_link(self, ifname: str, registration: Registration) -> None:
        fields = self._fields(registration)
        address = f"{registration.mesh_ip}/{registration.prefix_len}"
        if self._routes.ensure_address(ifname, address):
            log.info("address %s set on %s", address, ifname, extra=fields)
        if self._routes.ensure_up(ifname, mtu=registration.settings.mtu):
            log.info("link %s up, mtu %s", ifname, registration.settings.mtu, extra=fields)
        if self._routes.ensure_route(ifname, registration.settings.network):
            log.info("route %s via %s", registration.settings.network, ifname, extra=fields)


def _member_fields(node: str, members: Mapping[str, MemberRecord], event: str) -> dict[str, str]:
    member = members.get(node)
    return {
        "event": event,
        "node_id": node,
        "node_name": member.name if member else "?",
        "mesh_ip": member.mesh_ip if member else "?",
    }
