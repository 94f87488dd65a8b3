"""Reconcile: desired peers from membership, and the plan/events that reach them. Table-driven; no I/O."""

from __future__ import annotations

import base64
from types import MappingProxyType

import pytest

from meshcontract.messages import Endpoint, EndpointKind, MemberRecord, MemberState
from nodeagent.membership import MemberTable
from nodeagent.reconcile import desired_peers, desired_state, host_cidr, plan_reconcile, with_endpoints_resent
from wgctl import keys
from wgctl.memory import InMemoryWireGuard
from wgctl.model import PeerChanges, PeerConfig, PeerState

KEYS = {n: keys.public_key(keys.generate_private_key()) for n in ("a", "b", "c")}


def rec(
    node: str, ip: str, *, state: MemberState = MemberState.ACTIVE, endpoints: tuple[str, ...] = ()
) -> MemberRecord:
    eps = [Endpoint(host=h.rsplit(":", 1)[0].strip("[]"), port=int(h.rsplit(":", 1)[1])) for h in endpoints]
    return MemberRecord(
        node_id=node,
        name=f"host-{node}",
        mesh_ip=ip,
        public_key=KEYS[node],
        endpoints=eps,
        listen_port=51820,
        state=state,
        revision=1,
        updated_at=1.0,
    )


def membership(*records: MemberRecord) -> MemberTable:
    return MemberTable(revision=1, members=MappingProxyType({r.node_id: r for r in records}))


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        pytest.param([], {}, id="no members"),
        pytest.param([rec("a", "100.96.0.1")], {}, id="only ourselves"),
        pytest.param(
            [rec("a", "100.96.0.1"), rec("b", "100.96.0.2", endpoints=("192.0.2.2:51820", "198.51.100.2:1"))],
            {"b": PeerConfig(KEYS["b"], ("100.96.0.2/32",), "192.0.2.2:51820", 25)},
            id="first endpoint, /32, keepalive",
        ),
        pytest.param(
            [rec("b", "100.96.0.2", state=MemberState.UNREACHABLE), rec("c", "100.96.0.3")],
            {"c": PeerConfig(KEYS["c"], ("100.96.0.3/32",), None, 25)},
            id="unreachable members get no tunnel; no endpoint means None",
        ),
        pytest.param(
            [rec("b", "fd00::2", endpoints=("[2001:db8::2]:51820",))],
            {"b": PeerConfig(KEYS["b"], ("fd00::2/128",), "[2001:db8::2]:51820", 25)},
            id="IPv6 mesh IP and endpoint",
        ),
    ],
)
def test_desired_peers(records: list[MemberRecord], expected: dict[str, PeerConfig]) -> None:
    got = desired_peers(membership(*records), self_id="a", keepalive=25)
    assert got == {KEYS[n]: peer for n, peer in expected.items()}


def test_desired_skips_own_key_under_another_id() -> None:
    record = rec("b", "100.96.0.2")
    assert desired_peers(membership(record), self_id="a", self_public_key=KEYS["b"]) == {}


@pytest.mark.parametrize(("ip", "cidr"), [("100.96.0.7", "100.96.0.7/32"), ("fd00::1", "fd00::1/128")])
def test_host_cidr(ip: str, cidr: str) -> None:
    assert host_cidr(ip) == cidr


def test_plan_events_and_idempotence() -> None:
    wg = InMemoryWireGuard()
    wg.ensure_interface("wg0", private_key=keys.generate_private_key(), listen_port=51820)
    b, c = rec("b", "100.96.0.2", endpoints=("192.0.2.2:51820",)), rec("c", "100.96.0.3")
    by_key = {r.public_key: r for r in (b, c)}
    desired = desired_peers(membership(b, c), self_id="a")
    first = plan_reconcile(desired, wg.read("wg0").peers, members_by_key=by_key)
    assert sorted((e.kind, e.member.node_id) for e in first.events) == [("added", "b"), ("added", "c")]
    wg.apply("wg0", first.changes)
    # Converged: a second run applies nothing.
    second = plan_reconcile(desired, wg.read("wg0").peers, members_by_key=by_key)
    assert second.changes == PeerChanges() and second.events == ()
    # c goes unreachable, b moves endpoint: one removal, one update, nothing else.
    b2 = rec("b", "100.96.0.2", endpoints=("192.0.2.9:51820",))
    c2 = rec("c", "100.96.0.3", state=MemberState.UNREACHABLE)
    third = plan_reconcile(
        desired_peers(membership(b2, c2), self_id="a"), wg.read("wg0").peers, members_by_key=by_key
    )
    assert sorted((e.kind, e.member.node_id) for e in third.events) == [("removed", "c"), ("updated", "b")]
    assert third.changes.remove == (KEYS["c"],)


K = {n: keys.public_key(keys.generate_private_key()) for n in ("m1", "m2", "m3", "m4")}


def member(node: str, ip: str, *, key: str | None = None, endpoints: tuple[Endpoint, ...] = ()) -> MemberRecord:
    return MemberRecord(
        node_id=node, name=f"host-{node}", mesh_ip=ip, public_key=key or K[node], endpoints=list(endpoints),
        listen_port=51820, state=MemberState.ACTIVE, revision=1, updated_at=1.0,
    )  # fmt: skip


def held(record: MemberRecord) -> dict[str, PeerState]:
    """An interface where `record`'s peer already holds its mesh IP."""
    return {record.public_key: PeerState(record.public_key, (host_cidr(record.mesh_ip),))}


@pytest.mark.parametrize(
    ("records", "actual", "configured", "skipped"),
    [
        pytest.param(
            [member("m1", "100.96.0.2"), member("m2", "100.96.0.3")], {}, {"m1", "m2"}, {}, id="all fine",
        ),
        pytest.param(
            [member("m1", "100.96.0.2"), member("m2", "100.96.0.2"), member("m3", "100.96.0.3")], {},
            {"m3"}, {"m1": "mesh IP 100.96.0.2 is claimed by host-m2 (m2) too",
                     "m2": "mesh IP 100.96.0.2 is claimed by host-m1 (m1) too"},
            id="two claim one IP, nobody holds it: both skipped, the rest configured",
        ),
        pytest.param(
            [member("m1", "100.96.0.2"), member("m2", "100.96.0.2")], held(member("m2", "100.96.0.2")),
            {"m2"}, {"m1": "mesh IP 100.96.0.2 is claimed by host-m2 (m2) too"},
            id="the peer already holding the IP keeps it",
        ),
        pytest.param(
            [member("m1", "100.96.0.1"), member("m2", "100.96.0.3")], {}, {"m2"},
            {"m1": "it claims this node's own mesh IP 100.96.0.1"}, id="a member claiming our own IP",
        ),
        pytest.param(
            [member("m1", "100.96.0.2"), member("m2", "100.96.0.3", key=K["m1"])], {}, {"m1"},
            {"m2": "its public key is already node host-m1 (m1)'s"}, id="a key used twice: the lower node id keeps it",
        ),
    ],
)  # fmt: skip
def test_one_bad_record_is_skipped_and_the_rest_configured(records, actual, configured, skipped) -> None:
    desired = desired_state(membership(*records), self_id="a", self_mesh_ip="100.96.0.1", actual=actual)
    by_key = {r.public_key: r.node_id for r in records if r.node_id in configured}
    assert {by_key[k] for k in desired.peers} == configured
    assert desired.skipped == skipped


def test_no_usable_endpoint_is_a_note_not_a_skip() -> None:
    named = member("m1", "100.96.0.2", endpoints=(Endpoint(host="vpn.example.org", port=51820, kind=EndpointKind.PUBLIC),))
    desired = desired_state(membership(named), self_id="a", failed={"vpn.example.org"})
    assert desired.peers == {named.public_key: PeerConfig(named.public_key, ("100.96.0.2/32",), None, 25)}
    assert desired.skipped == {} and "vpn.example.org does not resolve" in desired.notes["m1"]
    resolved = desired_state(membership(named), self_id="a", resolved={"vpn.example.org": "198.51.100.7"})
    assert resolved.peers[named.public_key].endpoint == "198.51.100.7:51820" and resolved.notes == {}


def test_an_invalid_key_is_skipped() -> None:
    """A record that got past the contract's validation somehow (model_construct skips it): WireGuard would refuse
    its key, so it is skipped before it can spoil the batch of every other peer."""
    good = member("m1", "100.96.0.2")
    bad = MemberRecord.model_construct(**{**member("m2", "100.96.0.3").model_dump(), "public_key": "not-a-key"})
    desired = desired_state(membership(good, bad), self_id="a")
    assert list(desired.peers) == [good.public_key]
    assert list(desired.skipped) == ["m2"] and desired.skipped["m2"].startswith("WireGuard would refuse it")


def test_roaming_endpoint_is_never_overwritten_while_fresh() -> None:
    peer = member("m1", "100.96.0.2", endpoints=(Endpoint(host="192.168.1.5", port=51820),))
    roamed = PeerState(peer.public_key, ("100.96.0.2/32",), endpoint="203.0.113.9:61000", persistent_keepalive=25,
                       latest_handshake=1000.0)  # fmt: skip
    fresh = desired_state(membership(peer), self_id="a", actual={peer.public_key: roamed}, now=1010.0)
    assert plan_reconcile(fresh.peers, {peer.public_key: roamed}, members_by_key={}).changes == PeerChanges()
    stale = desired_state(membership(peer), self_id="a", actual={peer.public_key: roamed}, now=1000.0 + 181)
    changes = plan_reconcile(stale.peers, {peer.public_key: roamed}, members_by_key={}).changes
    assert [p.endpoint for p in changes.upsert] == ["192.168.1.5:51820"], "stale: back to the candidates"


def _key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def _cfg(n: int, endpoint: str | None) -> PeerConfig:
    return PeerConfig(_key(n), (f"100.96.0.{n}/32",), endpoint, 25)


def _state(n: int, endpoint: str | None) -> PeerState:
    return PeerState(_key(n), (f"100.96.0.{n}/32",), endpoint=endpoint, persistent_keepalive=25)


@pytest.mark.parametrize(
    ("changes", "desired", "actual", "expected"),
    [
        pytest.param(PeerChanges(), {2: _cfg(2, None)}, {2: _state(2, "198.51.100.7:40000")},
                     PeerChanges(upsert=(_cfg(2, "198.51.100.7:40000"),)),
                     id="no opinion on a roamed endpoint: the one WireGuard holds is set again"),
        pytest.param(PeerChanges(upsert=(_cfg(2, "192.0.2.2:51820"),)), {2: _cfg(2, "192.0.2.2:51820")},
                     {2: _state(2, "192.0.2.9:51820")}, PeerChanges(upsert=(_cfg(2, "192.0.2.2:51820"),)),
                     id="a peer the plan already sets is not sent twice"),
        pytest.param(PeerChanges(), {2: _cfg(2, None)}, {2: _state(2, None)}, PeerChanges(),
                     id="no endpoint to set again"),
        pytest.param(PeerChanges(remove=("gone",)), {}, {}, PeerChanges(remove=("gone",)),
                     id="removals stay as planned"),
    ],
)  # fmt: skip
def test_with_endpoints_resent(changes, desired, actual, expected) -> None:
    by_key = lambda m: {v.public_key: v for v in m.values()}  # noqa: E731
    assert with_endpoints_resent(changes, by_key(desired), by_key(actual)) == expected
