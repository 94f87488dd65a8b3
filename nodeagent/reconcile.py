"""Desired WireGuard peers from membership, and the plan that gets the interface there. No I/O here.

Desired state is a pure function of (complete membership, own node id, keepalive): one peer per ACTIVE member
other than ourselves (active, or lost by the control plane but not yet judged unreachable), AllowedIPs exactly its mesh IP as a host route, endpoint its first advertised endpoint.
The plan is `wgctl.diff.plan(desired, actual)`: only the difference, never a peer that is already right.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from meshcontract.messages import MemberRecord
from nodeagent.membership import MemberTable
from wgctl.diff import plan
from wgctl.model import PeerChanges, PeerConfig, PeerState

DEFAULT_KEEPALIVE_S = 25


def host_cidr(mesh_ip: str) -> str:
    """`mesh_ip` as a single-address CIDR: /32 for IPv4, /128 for IPv6."""
    return str(ipaddress.ip_network(mesh_ip))


def peer_for(record: MemberRecord, *, keepalive: int) -> PeerConfig:
    """The WireGuard peer that reaches `record`'s node."""
    endpoint = str(record.endpoints[0]) if record.endpoints else None
    return PeerConfig(
        public_key=record.public_key,
        allowed_ips=(host_cidr(record.mesh_ip),),
        endpoint=endpoint,
        persistent_keepalive=keepalive,
    )


def desired_peers(
    membership: MemberTable,
    *,
    self_id: str,
    self_public_key: str | None = None,
    keepalive: int = DEFAULT_KEEPALIVE_S,
) -> dict[str, PeerConfig]:
    """Public key -> desired peer for every active member except ourselves (by node id or by key)."""
    desired: dict[str, PeerConfig] = {}
    for record in membership.tunnelled():
        if record.node_id == self_id or record.public_key == self_public_key:
            continue
        # The registrar refuses a second node with the same key; should one slip through, the lower node id
        # wins deterministically on every agent instead of the peer flapping between two configs.
        desired.setdefault(record.public_key, peer_for(record, keepalive=keepalive))
    return desired


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
