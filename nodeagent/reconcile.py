"""Desired WireGuard peers from membership, and the plan that gets the interface there. No I/O here.

Desired state is a pure function of (complete membership, ourselves, what WireGuard reports, the endpoint trials,
the resolved host names, `now`): one peer per member that peers keep a tunnel to (active, or lost by the control
plane but not yet judged unreachable) other than ourselves, AllowedIPs exactly its mesh IP as a host route, the
endpoint nodeagent.endpoints chooses among its candidates. The plan is `wgctl.diff.plan(desired, actual)`: only
the difference, never a peer that is already right.

Per-peer isolation: a record that cannot be applied is skipped, with the reason, while every other peer is
configured. Skipped: a public key another member already uses (the lower node id keeps it), a mesh IP that is
ours or that another member claims too (the peer that already holds it on the interface keeps it; with no such
incumbent every claimant is skipped: routing that address to the wrong member would be worse than not routing
it), and a peer wgctl refuses. A record without a usable endpoint is *not* skipped: it is configured without
one (WireGuard learns it when the peer reaches us) and carries a note.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from meshcontract.messages import MemberRecord
from nodeagent.endpoints import Heard, Listed, Trial, plan_endpoints, silent_after
from nodeagent.membership import MemberTable
from wgctl.diff import canonical_cidr, plan, validated_peer
from wgctl.errors import WireGuardError
from wgctl.model import PeerChanges, PeerConfig, PeerState

DEFAULT_KEEPALIVE_S = 25
_NONE: Mapping = MappingProxyType({})


def host_cidr(mesh_ip: str) -> str:
    """`mesh_ip` as a single-address CIDR: /32 for IPv4, /128 for IPv6."""
    return str(ipaddress.ip_network(mesh_ip))


def peer_for(record: MemberRecord, *, keepalive: int, endpoint: str | None = None) -> PeerConfig:
    """The WireGuard peer that reaches `record`'s node at `endpoint` (None: no opinion on the endpoint)."""
    return PeerConfig(
        public_key=record.public_key,
        allowed_ips=(host_cidr(record.mesh_ip),),
        endpoint=endpoint,
        persistent_keepalive=keepalive,
    )


@dataclass(frozen=True, slots=True)
class Selection:
    """The members to configure (by public key) and the ones skipped (by node id, with why)."""

    records: dict[str, MemberRecord] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _who(record: MemberRecord) -> str:
    return f"{record.name} ({record.node_id})"


def select_members(
    membership: MemberTable,
    *,
    self_id: str,
    self_public_key: str | None = None,
    self_mesh_ip: str | None = None,
    actual: Mapping[str, PeerState] = _NONE,
) -> Selection:
    """The tunnelled members other than ourselves that can be configured, and why the others cannot."""
    by_key: dict[str, MemberRecord] = {}
    skipped: dict[str, str] = {}
    for record in membership.tunnelled():  # sorted by node id
        if record.node_id == self_id or record.public_key == self_public_key:
            continue
        # The registrar refuses a second node with the same key; should one slip through, the lower node id
        # wins deterministically on every agent instead of the peer flapping between two configs.
        first = by_key.setdefault(record.public_key, record)
        if first is not record:
            skipped[record.node_id] = f"its public key is already node {_who(first)}'s"
    own = canonical_cidr(self_mesh_ip) if self_mesh_ip else None
    claims: dict[str, list[MemberRecord]] = {}
    for record in by_key.values():
        cidr = host_cidr(record.mesh_ip)
        if cidr == own:
            skipped[record.node_id] = f"it claims this node's own mesh IP {record.mesh_ip}"
        else:
            claims.setdefault(cidr, []).append(record)
    chosen: dict[str, MemberRecord] = {}
    for cidr, claimants in claims.items():
        if len(claimants) == 1:
            chosen[claimants[0].public_key] = claimants[0]
            continue
        holders = [r for r in claimants if cidr in _cidrs(actual.get(r.public_key))]
        for record in claimants:
            if len(holders) == 1 and record is holders[0]:
                chosen[record.public_key] = record
                continue
            others = ", ".join(_who(r) for r in claimants if r is not record)
            skipped[record.node_id] = f"mesh IP {record.mesh_ip} is claimed by {others} too"
    return Selection(records=chosen, skipped=skipped)


def _cidrs(state: PeerState | None) -> set[str]:
    if state is None:
        return set()
    return {canonical_cidr(c) for c in state.allowed_ips}


@dataclass(frozen=True, slots=True)
class Desired:
    """Everything one reconcile pass wants, and what it could not have."""

    peers: dict[str, PeerConfig] = field(default_factory=dict)  # public key -> peer
    skipped: dict[str, str] = field(default_factory=dict)  # node id -> why its record is not configured
    notes: dict[str, str] = field(default_factory=dict)  # node id -> a problem of a configured peer
    trials: dict[str, Trial] = field(default_factory=dict)  # public key -> endpoint trial, for the next pass
    next_at: float | None = None  # when a trial ends: a pass is due then
    listed: dict[str, Listed] = field(default_factory=dict)  # public key -> its candidates, for the next pass


def desired_state(
    membership: MemberTable,
    *,
    self_id: str,
    self_public_key: str | None = None,
    self_mesh_ip: str | None = None,
    keepalive: int = DEFAULT_KEEPALIVE_S,
    actual: Mapping[str, PeerState] = _NONE,
    trials: Mapping[str, Trial] = _NONE,
    resolved: Mapping[str, str] = _NONE,
    failed: Collection[str] = (),
    own_reflexive: str | None = None,
    now: float = 0.0,
    heard: Mapping[str, Heard] = _NONE,
    listed: Mapping[str, Listed] = _NONE,
) -> Desired:
    """The peers to configure for `membership` and the records skipped (see the module docstring).

    `resolved` maps lowercased host names to an address, `failed` holds names whose lookup failed;
    `own_reflexive` is the address the registrar sees us come from (nodeagent.endpoints orders by it);
    `heard` says since when each peer's received bytes stand still (a silent tunnel tries other candidates).
    """
    selection = select_members(
        membership, self_id=self_id, self_public_key=self_public_key, self_mesh_ip=self_mesh_ip, actual=actual
    )
    choices = plan_endpoints(
        selection.records.values(), actual=actual, trials=trials, resolved=resolved, failed=failed,
        own_reflexive=own_reflexive, now=now, heard=heard, silent_s=silent_after(keepalive), listed=listed,
    )  # fmt: skip
    peers: dict[str, PeerConfig] = {}
    skipped = dict(selection.skipped)
    notes: dict[str, str] = {}
    for key, record in selection.records.items():
        peer = peer_for(record, keepalive=keepalive, endpoint=choices.endpoints.get(key))
        try:
            validated_peer(peer)
        except WireGuardError as exc:  # what every backend would refuse: skip it before it spoils a batch
            skipped[record.node_id] = f"WireGuard would refuse it: {exc}"
            continue
        peers[key] = peer
        if key in choices.unusable:
            names = ", ".join(choices.unusable[key])
            notes[record.node_id] = f"no usable endpoint ({names} does not resolve); waiting for it to reach us"
    trials_kept = {k: t for k, t in choices.trials.items() if k in peers}
    listed_kept = {k: v for k, v in choices.listed.items() if k in peers}
    return Desired(peers, skipped, notes, trials_kept, choices.next_at, listed_kept)


def desired_peers(
    membership: MemberTable,
    *,
    self_id: str,
    self_public_key: str | None = None,
    keepalive: int = DEFAULT_KEEPALIVE_S,
) -> dict[str, PeerConfig]:
    """Public key -> desired peer for every tunnelled member except ourselves, on a fresh interface (each peer on
    its first candidate)."""
    return desired_state(membership, self_id=self_id, self_public_key=self_public_key, keepalive=keepalive).peers


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """One tunnel change to log: what happened to which peer, with the member it belongs to (if known)."""

    kind: Literal["added", "updated", "removed"]
    public_key: str
    member: MemberRecord | None


@dataclass(frozen=True, slots=True)
class ReconcilePlan:
    """The changes to apply and the events they amount to."""

    changes: PeerChanges
    events: tuple[PeerEvent, ...]


def plan_reconcile(
    desired: Mapping[str, PeerConfig],
    actual: Mapping[str, PeerState],
    *,
    members_by_key: Mapping[str, MemberRecord],
) -> ReconcilePlan:
    """The changes that bring `actual` to `desired`, with one event per touched peer.

    `members_by_key` names peers in events; pass every record known (also removed ones) so a removed peer
    can still be logged with its node id and name.
    """
    changes = plan(desired, actual)
    events = [
        PeerEvent(
            "updated" if peer.public_key in actual else "added",
            peer.public_key,
            members_by_key.get(peer.public_key),
        )
        for peer in changes.upsert
    ]
    events += [PeerEvent("removed", key, members_by_key.get(key)) for key in changes.remove]
    return ReconcilePlan(changes=changes, events=tuple(events))


def with_endpoints_resent(
    changes: PeerChanges, desired: Mapping[str, PeerConfig], actual: Mapping[str, PeerState]
) -> PeerChanges:
    """`changes` plus, for every desired peer it leaves alone that has an endpoint, that same endpoint set again.

    For after our own address changed (a roam): wireguard-go remembers the source address it last sent to each
    peer from and, when that address is gone, keeps failing to send (ENETUNREACH) until it has heard nothing back
    for 15 s. Setting an endpoint gives it a fresh one without a remembered source, so the first packet after the
    roam leaves from the new address. The kernel module checks the source itself; the write costs it nothing.
    """
    touched = {peer.public_key for peer in changes.upsert}
    resent = tuple(
        PeerConfig(peer.public_key, peer.allowed_ips, actual[key].endpoint, peer.persistent_keepalive)
        for key, peer in sorted(desired.items())
        if key not in touched and key in actual and actual[key].endpoint is not None
    )
    return PeerChanges(upsert=changes.upsert + resent, remove=changes.remove)
