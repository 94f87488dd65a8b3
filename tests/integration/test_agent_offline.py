"""The agent with no control plane at all: it restores the mesh from its state directory and keeps it.

No broker listens on the configured port (a free port on 127.0.0.1), so everything here is what an agent does
when it is (re)started during a control-plane outage.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import MappingProxyType

from brokers import free_port
from harness import agent_settings, pre_enroll

from meshcontract.messages import Endpoint, MemberRecord, MemberState, MeshSettings
from meshcontract.signing import Signer
from nodeagent.agent import Agent
from nodeagent.membership import MemberTable
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Registration, StateStore
from wgctl import keys
from wgctl.memory import InMemoryRoutes, InMemoryWireGuard


def _member(node: str, ip: str, state: MemberState = MemberState.ACTIVE) -> MemberRecord:
    return MemberRecord(
        node_id=node, name=node, mesh_ip=ip, public_key=keys.public_key(keys.generate_private_key()),
        endpoints=[Endpoint(host="127.0.0.1", port=40000 + int(ip.rsplit(".", 1)[1]))], listen_port=51820,
        state=state, revision=5, updated_at=1.0,
    )  # fmt: skip


def _prepared_state(state_dir: Path) -> tuple[list[MemberRecord], Registration]:
    pre_enroll(state_dir, signing_key=Signer.generate().public_key, mesh="itmesh")
    store = StateStore(state_dir)
    node_id = store.node_id()
    members = [
        _member(node_id, "100.96.0.1"),
        _member("peer-b", "100.96.0.2"),
        _member("peer-c", "100.96.0.3"),
        _member("peer-d", "100.96.0.4", MemberState.UNREACHABLE),
    ]
    store.save_membership(MemberTable(revision=5, members=MappingProxyType({m.node_id: m for m in members})))
    settings = MeshSettings(mesh="mesh", network="100.96.0.0/16", heartbeat_interval_s=1, heartbeat_ttl_s=3,
                            persistent_keepalive_s=21, mtu=1380)  # fmt: skip
    registration = Registration(mesh_ip="100.96.0.1", prefix_len=16, settings=settings)
    store.save_registration(registration)
    return members, registration


def _settings(state_dir: Path, **kw: object) -> AgentSettings:
    # No broker listens on a fresh free port: the agent runs without any control plane.
    return agent_settings(state_dir, f"mqtt://127.0.0.1:{free_port()}", reconcile_interval_s=0.2, **kw)


def test_restores_mesh_before_any_broker_and_keeps_it(tmp_path: Path) -> None:
    members, registration = _prepared_state(tmp_path / "state")
    wireguard = InMemoryWireGuard()
    routes = InMemoryRoutes(wireguard)
    agent = Agent(_settings(tmp_path / "state"), wireguard=wireguard, routes=routes, local_api=False)
    agent.start()
    try:
        # Done inside start(), before the session thread has even tried the broker.
        peers = wireguard.read("meshvpn0").peers
        assert set(peers) == {members[1].public_key, members[2].public_key}, "active peers except self"
        assert peers[members[1].public_key].allowed_ips == ("100.96.0.2/32",)
        assert peers[members[1].public_key].endpoint == "127.0.0.1:40002"
        assert peers[members[1].public_key].persistent_keepalive == 21, "keepalive from the mesh settings"
        assert routes.addresses("meshvpn0") == ["100.96.0.1/16"]
        assert routes.link("meshvpn0") == (True, 1380)
        assert routes.routes()["100.96.0.0/16"] == "meshvpn0"
        status = agent.status()
        assert not status.broker_connected and not status.registrar_online
        assert status.mesh_ip == "100.96.0.1" and status.membership_revision == 5
        # Several periodic passes without a broker change nothing.
        wireguard.clear_operations()
        start = agent.reconcile_count
        deadline = time.monotonic() + 10
        while agent.reconcile_count < start + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.reconcile_count >= start + 3
        assert wireguard.operations == []
        assert registration == StateStore(tmp_path / "state").registration()
    finally:
        agent.stop()
    assert wireguard.interfaces() == ["meshvpn0"], "keep_interface_on_stop defaults to true"


def test_stop_can_delete_the_interface(tmp_path: Path) -> None:
    _prepared_state(tmp_path / "state")
    wireguard = InMemoryWireGuard()
    settings = _settings(tmp_path / "state", keep_interface_on_stop=False)
    agent = Agent(settings, wireguard=wireguard, routes=InMemoryRoutes(wireguard), local_api=False)
    agent.start()
    assert wireguard.interfaces() == ["meshvpn0"]
    agent.stop()
    assert wireguard.interfaces() == []
