"""The agent's reaction to the membership stream as it arrives over a real broker, without a registrar.

A probe client plays the registrar's publishing side (a signed retained snapshot, signed deltas), with a key the
agent was told to trust at its (pre-made) enrollment, so each case controls exactly what the agent sees and in
which order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import ProbeClient, RunningBroker
from harness import agent_settings, pre_enroll
from polling import wait_for

from meshcontract import messages, topics
from meshcontract.messages import Endpoint, MemberRecord, MembershipDelta, MembershipSnapshot, MemberState
from meshcontract.signing import Signer
from meshcontract.topics import Kind
from nodeagent.agent import Agent
from wgctl import keys
from wgctl.memory import InMemoryRoutes, InMemoryWireGuard

MESH = "viewmesh"


def _record(i: int, revision: int, state: MemberState = MemberState.ACTIVE) -> MemberRecord:
    return MemberRecord(
        node_id=f"peer{i}", name=f"peer{i}", mesh_ip=f"100.96.1.{i}", public_key=KEYS[i],
        endpoints=[Endpoint(host="127.0.0.1", port=41000 + i)], listen_port=51820, state=state,
        revision=revision, updated_at=time.time(),
    )  # fmt: skip


KEYS = [keys.public_key(keys.generate_private_key()) for _ in range(64)]


@pytest.fixture
def broker(mosquitto: RunningBroker) -> RunningBroker:
    """These cases need one broker only: Mosquitto."""
    return mosquitto


SIGNER = Signer.generate()


@pytest.fixture
def agent(tmp_path: Path, broker: RunningBroker) -> Iterator[tuple[Agent, InMemoryWireGuard]]:
    wireguard = InMemoryWireGuard()
    pre_enroll(tmp_path / "state", signing_key=SIGNER.public_key, mesh=MESH)
    settings = agent_settings(
        tmp_path / "state", broker.url, mesh=MESH, name="self", reconcile_interval_s=30  # periodic passes out of the way
    )
    running = Agent(settings, wireguard=wireguard, routes=InMemoryRoutes(wireguard), local_api=False)
    running.start()
    try:
        wait_for(lambda: running.broker_connected, timeout=10, what="agent connected")
        yield running, wireguard
    finally:
        running.stop()


def _signed(message, kind: Kind) -> bytes:
    return messages.encode(message.model_copy(update={"sig": SIGNER.sign(message, kind=str(kind), mesh=MESH)}))


def _snapshot(probe: ProbeClient, revision: int, records: list[MemberRecord]) -> None:
    snap = MembershipSnapshot(mesh=MESH, revision=revision, members=records, published_at=time.time())
    probe.publish(topics.build(MESH, Kind.SNAPSHOT), _signed(snap, Kind.SNAPSHOT), qos=1, retain=True)


def _delta(probe: ProbeClient, start: int, end: int, *, up=(), down=(), wait: bool = True) -> None:
    delta = MembershipDelta(
        mesh=MESH, from_revision=start, to_revision=end, upserts=list(up), removals=list(down), published_at=time.time()
    )
    payload = _signed(delta, Kind.DELTA)
    if wait:
        probe.publish(topics.build(MESH, Kind.DELTA), payload, qos=1)
    else:
        probe.client.publish(topics.build(MESH, Kind.DELTA), payload, qos=1)


def test_bursts_coalesce_into_few_passes(
    agent: tuple[Agent, InMemoryWireGuard], broker: RunningBroker
) -> None:
    running, wireguard = agent
    with ProbeClient(broker, client_id="fake-registrar") as probe:
        _snapshot(probe, 0, [])
        wait_for(lambda: running.status().membership_complete, timeout=10, what="agent in sync at revision 0")
        before = running.reconcile_count
        # 40 joins in a burst, one delta each, sent without waiting for PUBACKs, so they arrive faster than a
        # reconcile pass.
        for i in range(1, 41):
            _delta(probe, i - 1, i, up=[_record(i, revision=i)], wait=False)
        wait_for(lambda: len(wireguard.read("meshvpn0").peers) == 40, timeout=15, what="40 peers")
    passes = running.reconcile_count - before
    print(f"40 membership deltas -> {passes} reconcile passes, {wireguard.apply_calls} apply calls")
    assert passes < 40, "bursts are coalesced: the loop works on the newest state, not on every message"
    assert {p.allowed_ips for p in wireguard.read("meshvpn0").peers.values()} == {
        (f"100.96.1.{i}/32",) for i in range(1, 41)
    }


def test_unreachable_removed_gap_then_snapshot(
    agent: tuple[Agent, InMemoryWireGuard], broker: RunningBroker
) -> None:
    running, wireguard = agent
    with ProbeClient(broker, client_id="fake-registrar") as probe:
        a, b, c = _record(1, 1), _record(2, 2), _record(3, 3)
        _snapshot(probe, 3, [a, b, c])
        wait_for(lambda: len(wireguard.read("meshvpn0").peers) == 3, timeout=10, what="3 peers")
        # b goes unreachable: removed at once.
        _delta(probe, 3, 4, up=[_record(2, 4, MemberState.UNREACHABLE)])
        wait_for(lambda: KEYS[2] not in wireguard.read("meshvpn0").peers, timeout=10, what="b removed")
        # A delta from revision 6 means we missed 4 -> 6: c stays until a snapshot says otherwise...
        _delta(probe, 6, 7, down=["peer3"])
        wait_for(lambda: not running.status().membership_complete, timeout=10, what="syncing after a gap")
        assert KEYS[3] in wireguard.read("meshvpn0").peers
        # ...which the agent asked for (it subscribed to it again) and adopts when it comes.
        _snapshot(probe, 7, [a, _record(2, 4, MemberState.UNREACHABLE)])
        wait_for(lambda: KEYS[3] not in wireguard.read("meshvpn0").peers, timeout=10, what="c removed")
        assert set(wireguard.read("meshvpn0").peers) == {KEYS[1]}
        assert running.status().membership_complete and running.status().membership_revision == 7


def test_unsigned_or_foreign_membership_is_dropped(
    agent: tuple[Agent, InMemoryWireGuard], broker: RunningBroker
) -> None:
    running, wireguard = agent
    with ProbeClient(broker, client_id="fake-registrar") as probe:
        _snapshot(probe, 3, [_record(1, 1)])
        wait_for(lambda: len(wireguard.read("meshvpn0").peers) == 1, timeout=10, what="1 peer")
        _delta(probe, 5, 6, up=[_record(5, 6)])  # a gap: the agent subscribes to the snapshot again
        wait_for(lambda: not running.status().membership_complete, timeout=10, what="syncing")
        forged = MembershipSnapshot(mesh=MESH, revision=9, members=[_record(i, 9) for i in (1, 2, 3)], published_at=1.0)
        probe.publish(topics.build(MESH, Kind.SNAPSHOT), messages.encode(forged), qos=1, retain=True)
        other = Signer.generate()
        resigned = forged.model_copy(update={"sig": other.sign(forged, kind="snapshot", mesh=MESH)})
        probe.publish(topics.build(MESH, Kind.SNAPSHOT), messages.encode(resigned), qos=1, retain=True)
        # A genuine snapshot after the forgeries: adopted, and only it counts.
        _snapshot(probe, 6, [_record(1, 1), _record(4, 6)])
        wait_for(lambda: KEYS[4] in wireguard.read("meshvpn0").peers, timeout=10, what="the genuine snapshot")
        assert set(wireguard.read("meshvpn0").peers) == {KEYS[1], KEYS[4]}
        assert running.status().membership_revision == 6
