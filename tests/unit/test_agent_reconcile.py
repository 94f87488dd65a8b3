"""Reconcile: desired peers from membership, and the plan/events that reach them. Table-driven; no I/O."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from meshcontract.messages import Endpoint, MemberRecord, MemberState
from nodeagent.membership import MemberTable
from nodeagent.reconcile import desired_peers, host_cidr, plan_reconcile
from wgctl import keys
from wgctl.memory import InMemoryWireGuard
from wgctl.model import PeerChanges, PeerConfig

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
