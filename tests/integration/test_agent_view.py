"""The agent's reaction to retained membership as it arrives over a real broker, without a registrar.

A probe client plays the registrar's publishing side (records, tombstones, roster), so each case controls
exactly what the agent sees and in which order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import ProbeClient, RunningBroker
from harness import agent_settings
from polling import wait_for

from meshcontract import messages, topics
from meshcontract.messages import Endpoint, MemberRecord, MemberState, Roster, RosterEntry
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


@pytest.fixture
def agent(tmp_path: Path, broker: RunningBroker) -> Iterator[tuple[Agent, InMemoryWireGuard]]:
    wireguard = InMemoryWireGuard()
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


def _publish_state(probe: ProbeClient, revision: int, records: list[MemberRecord]) -> None:
    for record in records:
        probe.publish(
            topics.build(MESH, Kind.MEMBERS, record.node_id), messages.encode(record), qos=1, retain=True
        )
    roster = Roster(
        mesh=MESH, revision=revision, published_at=time.time(),
        members=[RosterEntry(node_id=r.node_id, revision=r.revision) for r in records],
    )  # fmt: skip
    probe.publish(topics.build(MESH, Kind.ROSTER), messages.encode(roster), qos=1, retain=True)


def test_bursts_coalesce_into_few_passes(
    agent: tuple[Agent, InMemoryWireGuard], broker: RunningBroker
) -> None:
    running, wireguard = agent
    before = running.reconcile_count
    with ProbeClient(broker, client_id="fake-registrar") as probe:
        probe.connect()
        # 40 joins in a burst, each a record and then a roster listing everyone so far, as the registrar
        # publishes them; sent without waiting for PUBACKs, so they arrive faster than a reconcile pass.
        records: list[MemberRecord] = []
        for i in range(1, 41):
            records.append(_record(i, revision=i))
            topic = topics.build(MESH, Kind.MEMBERS, f"peer{i}")
            probe.client.publish(topic, messages.encode(records[-1]), qos=1, retain=True)
            entries = [RosterEntry(node_id=r.node_id, revision=r.revision) for r in records]
            roster = Roster(mesh=MESH, revision=i, published_at=time.time(), members=entries)
            probe.client.publish(topics.build(MESH, Kind.ROSTER), messages.encode(roster), qos=1, retain=True)
        wait_for(lambda: len(wireguard.read("meshvpn0").peers) == 40, timeout=15, what="40 peers")
    passes = running.reconcile_count - before
    print(f"80 membership messages -> {passes} reconcile passes, {wireguard.apply_calls} apply calls")
    assert passes < 40, "bursts are coalesced: the loop works on the newest state, not on every message"
    assert {p.allowed_ips for p in wireguard.read("meshvpn0").peers.values()} == {
        (f"100.96.1.{i}/32",) for i in range(1, 41)
    }


def test_unreachable_and_tombstone_then_roster(
    agent: tuple[Agent, InMemoryWireGuard], broker: RunningBroker
) -> None:
    running, wireguard = agent
    with ProbeClient(broker, client_id="fake-registrar") as probe:
        probe.connect()
        a, b, c = _record(1, 1), _record(2, 2), _record(3, 3)
        _publish_state(probe, 3, [a, b, c])
        wait_for(lambda: len(wireguard.read("meshvpn0").peers) == 3, timeout=10, what="3 peers")
        # b goes unreachable (a newer record than the roster entry keeps the view complete): removed at once.
        probe.publish(topics.build(MESH, Kind.MEMBERS, "peer2"),
                      messages.encode(_record(2, 4, MemberState.UNREACHABLE)), qos=1, retain=True)  # fmt: skip
        wait_for(lambda: KEYS[2] not in wireguard.read("meshvpn0").peers, timeout=10, what="b removed")
        # c's tombstone alone leaves the view partial (the roster still lists c): c stays...
        probe.publish(topics.build(MESH, Kind.MEMBERS, "peer3"), b"", qos=1, retain=True)
        wait_for(lambda: not running.status().membership_complete, timeout=10, what="partial view")
        assert KEYS[3] in wireguard.read("meshvpn0").peers
        # ...until the roster without c completes the view again.
        _publish_state(probe, 5, [a, _record(2, 4, MemberState.UNREACHABLE)])
        wait_for(lambda: KEYS[3] not in wireguard.read("meshvpn0").peers, timeout=10, what="c removed")
        assert set(wireguard.read("meshvpn0").peers) == {KEYS[1]}
