"""The reconcile loop's shell (nodeagent.reconciler) on in-memory WireGuard: one peer WireGuard refuses never
blocks the others, skips are reported once, endpoint trials carry over between passes. Time is a fake clock."""

from __future__ import annotations

import logging
from pathlib import Path
from types import MappingProxyType

import pytest

from meshcontract.messages import Endpoint, EndpointKind, MemberRecord, MemberState
from nodeagent.endpoints import TRIAL_S
from nodeagent.identity import Identity
from nodeagent.membership import MemberTable
from nodeagent.meshstate import MeshState
from nodeagent.reconciler import Reconciler
from nodeagent.settings import AgentSettings
from nodeagent.statestore import StateStore
from wgctl import keys
from wgctl.errors import InvalidConfigError
from wgctl.memory import InMemoryRoutes, InMemoryWireGuard
from wgctl.model import PeerChanges

IFNAME = "meshvpn0"


class RefusingWireGuard(InMemoryWireGuard):
    """Refuses, like a kernel answering EINVAL, any request that configures a key in `refuse`."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[str] = set()
        self.requests: list[PeerChanges] = []

    def apply(self, name: str, changes: PeerChanges) -> None:
        self.requests.append(changes)
        if any(p.public_key in self.refuse for p in changes.upsert):
            raise InvalidConfigError("Invalid argument")
        super().apply(name, changes)


def record(n: int, *endpoints: Endpoint) -> MemberRecord:
    return MemberRecord(
        node_id=f"m{n}", name=f"host-{n}", mesh_ip=f"100.96.0.{n}", public_key=keys.public_key(keys.generate_private_key()),
        endpoints=list(endpoints), listen_port=51820, state=MemberState.ACTIVE, revision=1, updated_at=1.0,
    )  # fmt: skip


def table(*records: MemberRecord) -> MemberTable:
    return MemberTable(revision=3, members=MappingProxyType({r.node_id: r for r in records}))


@pytest.fixture
def make(tmp_path: Path):
    def make(membership: MemberTable, clock: list[float], greet=lambda ips: None) -> tuple[Reconciler, RefusingWireGuard]:
        private = keys.generate_private_key()
        me = Identity(node_id="self", name="self", private_key=private, public_key=keys.public_key(private))
        wireguard = RefusingWireGuard()
        reconciler = Reconciler(
            AgentSettings(state_dir=tmp_path, persistent_keepalive_s=25), identity=me, wireguard=wireguard,
            routes=InMemoryRoutes(wireguard), mesh=MeshState(membership), store=StateStore(tmp_path),
            registration=lambda: None, greet=greet, clock=lambda: clock[0],
        )  # fmt: skip
        return reconciler, wireguard

    return make


def test_a_refused_peer_is_skipped_reported_once_and_the_rest_configured(make, caplog) -> None:
    records = [record(n) for n in range(2, 7)]
    bad = records[2]
    reconciler, wireguard = make(table(*records), [1000.0])
    wireguard.ensure_interface(IFNAME, private_key=keys.generate_private_key(), listen_port=51820)
    wireguard.refuse.add(bad.public_key)
    caplog.set_level(logging.INFO, logger="nodeagent.reconciler")

    reconciler.reconcile_once("test")

    peers = wireguard.read(IFNAME).peers
    assert set(peers) == {r.public_key for r in records if r is not bad}, "every other peer configured"
    assert reconciler.problems() == {bad.node_id: "not configured: WireGuard refused it: Invalid argument"}
    assert reconciler.counters["peer_skipped"] == 1 and reconciler.counters["peer_added"] == 4

    # Later passes: the refused peer is tried on its own (one request), nothing logged or counted again.
    wireguard.requests.clear()
    for _ in range(3):
        reconciler.reconcile_once("test")
    assert wireguard.requests == [PeerChanges(upsert=(wireguard.requests[0].upsert[0],))] * 3
    assert wireguard.requests[0].upsert[0].public_key == bad.public_key
    assert reconciler.counters["peer_skipped"] == 1
    assert [r.message for r in caplog.records].count("peer skipped: WireGuard refused it: Invalid argument") == 1

    # WireGuard takes it now: configured, and the problem is gone (logged once).
    wireguard.refuse.clear()
    reconciler.reconcile_once("test")
    assert bad.public_key in wireguard.read(IFNAME).peers and reconciler.problems() == {}
    assert any(r.message == "peer no longer skipped" for r in caplog.records)


def test_peers_a_pass_adds_are_greeted_and_no_others(make) -> None:
    records = [record(n) for n in range(2, 6)]
    bad = records[1]
    greeted: list[list[str]] = []
    reconciler, wireguard = make(table(*records), [1000.0], greet=greeted.append)
    wireguard.ensure_interface(IFNAME, private_key=keys.generate_private_key(), listen_port=51820)
    wireguard.refuse.add(bad.public_key)

    reconciler.reconcile_once("test")
    assert [sorted(ips) for ips in greeted] == [sorted(r.mesh_ip for r in records if r is not bad)], (
        "added peers, not the refused one")
    reconciler.reconcile_once("test")
    assert len(greeted) == 1, "a pass that adds nothing greets nobody"

    wireguard.refuse.clear()
    reconciler.reconcile_once("test")
    assert greeted[1:] == [[bad.mesh_ip]]

    # A peer gone from WireGuard (here by hand; in the mesh, removed while unreachable) and added back is a new
    # session on our side only: greeted again.
    wireguard.apply(IFNAME, PeerChanges(remove=(records[0].public_key,)))
    reconciler.reconcile_once("test")
    assert greeted[2:] == [[records[0].mesh_ip]]


def test_every_peer_refused_is_a_failed_pass_not_a_skip(make) -> None:
    records = [record(n) for n in range(2, 5)]
    reconciler, wireguard = make(table(*records), [1000.0])
    wireguard.ensure_interface(IFNAME, private_key=keys.generate_private_key(), listen_port=51820)
    wireguard.refuse.update(r.public_key for r in records)
    reconciler.reconcile_once("test")
    assert reconciler.counters["reconcile_failed"] == 1 and reconciler.problems() == {}


def test_endpoint_trials_carry_over_between_passes(make) -> None:
    lan, nat = Endpoint(host="192.168.1.5", port=51820), Endpoint(host="203.0.113.9", port=51820, kind=EndpointKind.REFLEXIVE)
    peer = record(2, lan, nat)
    clock = [1000.0]
    reconciler, wireguard = make(table(peer), clock)

    def endpoint() -> str | None:
        return wireguard.read(IFNAME).peers[peer.public_key].endpoint

    reconciler.reconcile_once("test")
    assert endpoint() == "203.0.113.9:51820", "reflexive before local (not behind our NAT)"
    clock[0] += TRIAL_S - 1
    reconciler.reconcile_once("test")
    assert endpoint() == "203.0.113.9:51820", "still on trial"
    clock[0] += 1
    reconciler.reconcile_once("test")
    assert endpoint() == "192.168.1.5:51820", "no handshake within the trial: the next candidate"
    # A handshake (from wherever the peer's packets came) ends the trials; nothing is written while it is fresh.
    wireguard.simulate_handshake(IFNAME, peer.public_key, at=clock[0])
    wireguard.clear_operations()
    for _ in range(3):
        clock[0] += TRIAL_S
        reconciler.reconcile_once("test")
    assert wireguard.operations == []
