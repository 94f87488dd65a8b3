"""Agents, a real registrar and a real broker: the mesh converges and survives failures.

The harness (tests/harness.py) runs the registrar as a subprocess so it can be killed and restarted, a real
broker of each kind (tests/brokers.py), and the agents in this process on the in-memory WireGuard backend.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import httpx
import pytest
from brokers import ProbeClient, RunningBroker, free_port
from harness import HEARTBEAT_S, IFNAME, MESH, RECONCILE_S, REGISTRAR_PASSWORD, TTL_S, Mesh, Registrar
from polling import wait_for

from meshcontract import messages, topics
from meshcontract.localapi import LocalRequest
from meshcontract.messages import EnrollRequest, MembershipDelta, MembershipSnapshot
from meshcontract.signing import Signer
from meshcontract.topics import Kind
from nodeagent.errors import EnrollmentRefused
from nodeagent.statestore import StateStore
from wgctl import keys
from wgctl.model import PeerChanges


def test_mesh_completes_symmetric_and_idempotent(mesh: Mesh) -> None:
    for name in ("alpha", "beta", "gamma", "delta"):
        mesh.add(name)
    mesh.wait_complete()
    ips = {n.agent.mesh_ip for n in mesh.running()}  # type: ignore[union-attr]
    assert len(ips) == 4, "every node has its own mesh IP"
    for node in mesh.running():
        assert node.routes.addresses(IFNAME) == [f"{node.agent.mesh_ip}/16"]  # type: ignore[union-attr]
        assert node.routes.link(IFNAME) == (True, 1420)
    # Converged: further reconcile passes (periodic, every RECONCILE_S) change nothing.
    for node in mesh.running():
        node.wireguard.clear_operations()
    wait_for(mesh.reconciled_more(), timeout=10, what="two more reconcile passes everywhere")
    assert all(n.wireguard.operations == [] for n in mesh.running()), "a converged reconcile applies nothing"


def test_leave_join_crash_restart(mesh: Mesh) -> None:
    for name in ("alpha", "beta", "gamma"):
        mesh.add(name)
    mesh.wait_complete()

    # Graceful leave: status offline -> unreachable -> everyone drops the tunnel.
    mesh.stop("gamma")
    mesh.wait_complete(timeout=10)

    # Join: a new node gets a tunnel to and from everyone.
    mesh.add("delta")
    mesh.wait_complete()

    # Crash: no goodbye; the broker's will and/or the heartbeat TTL take it out of everyone's peers.
    beta_ip = mesh.nodes["beta"].agent.mesh_ip  # type: ignore[union-attr]
    mesh.crash("beta")
    mesh.wait_complete(timeout=TTL_S + 10)

    # Restart after the crash (same state dir, same kernel): same node id and mesh IP, back everywhere.
    agent = mesh.start("beta")
    mesh.wait_complete()
    assert agent.mesh_ip == beta_ip

    # The gracefully stopped node comes back too, with its old IP.
    mesh.start("gamma")
    mesh.wait_complete()


def test_silent_node_is_removed_by_ttl_and_returns(mesh: Mesh) -> None:
    """A node that stays connected but stops heartbeating (frozen, partitioned) fires no will: the
    registrar's TTL takes it out; its next heartbeat (same epoch) brings it back."""
    for name in ("alpha", "beta", "gamma"):
        mesh.add(name)
    mesh.wait_complete()
    beta = mesh.nodes["beta"]
    alpha, gamma = mesh.nodes["alpha"], mesh.nodes["gamma"]
    beta_key = beta.agent.public_key  # type: ignore[union-attr]
    started = time.monotonic()
    beta.faults.pause_heartbeats()
    wait_for(
        lambda: beta_key not in alpha.peers() and beta_key not in gamma.peers(),
        timeout=TTL_S + 8,
        what="beta removed by the heartbeat TTL",
    )
    assert time.monotonic() - started >= TTL_S * 0.5, "removed by the TTL, not by something faster"
    assert len(beta.peers()) == 2, "beta itself keeps its tunnels to the live members"
    beta.faults.pause_heartbeats(False)
    mesh.wait_complete(timeout=10)


def test_control_plane_outage_keeps_every_tunnel(
    mesh: Mesh, broker: RunningBroker, registrar: Registrar
) -> None:
    for name in ("alpha", "beta", "gamma"):
        mesh.add(name)
    mesh.wait_complete()
    converged = mesh.snapshot()

    # Broker down: agents notice, keep retrying, keep every tunnel through several reconcile passes.
    broker.stop()
    wait_for(
        lambda: not any(n.agent.broker_connected for n in mesh.running()),
        timeout=10,  # type: ignore[union-attr]
        what="agents notice the broker is gone",
    )
    wait_for(mesh.reconciled_more(), timeout=10, what="reconcile passes during the broker outage")
    assert mesh.snapshot() == converged

    # Registrar down too, then an agent restarts during the outage on a rebooted machine (empty interface):
    # it restores its tunnels from the persisted membership before the broker is reachable.
    registrar.kill()
    mesh.stop("gamma")
    agent = mesh.start("gamma", fresh_kernel=True)
    assert mesh.nodes["gamma"].peers() == converged["gamma"], "restored from membership.json at start-up"
    assert not agent.broker_connected

    # Broker back, registrar still down: the broker restarted empty (no retained state), so the agents'
    # views hold no newer complete membership and nothing is removed.
    broker.start()
    wait_for(
        lambda: all(n.agent.broker_connected for n in mesh.running()),
        timeout=15,  # type: ignore[union-attr]
        what="agents reconnect to the restarted broker",
    )
    wait_for(mesh.reconciled_more(), timeout=10, what="reconcile passes with the registrar down")
    assert mesh.snapshot() == converged
    status = mesh.nodes["alpha"].agent.status()  # type: ignore[union-attr]
    assert status.broker_connected and not status.registrar_online

    # Registrar back: everyone re-registers, the mesh is the same as before the outage.
    registrar.start()
    wait_for(
        lambda: all(n.agent.registered.is_set() for n in mesh.running()),
        timeout=20,  # type: ignore[union-attr]
        what="everyone registered again",
    )
    mesh.wait_complete()
    assert mesh.snapshot() == converged
    # Nobody may be taken for silent once the registrar's grace (TTL + interval) is over: agents heartbeat from
    # their first connection (the restarted gamma too), and a registration sent before the registrar was back
    # goes out again the moment it comes online. An observation window, not a wait for a condition:
    removed_before = mesh.peers_removed()
    time.sleep(TTL_S + HEARTBEAT_S + 1.0)
    assert [n["state"] for n in registrar.nodes()] == ["active"] * 3, registrar.nodes()
    assert mesh.peers_removed() == removed_before, "no peer was removed, not even briefly"
    assert mesh.snapshot() == converged


def test_forged_stale_and_partial_membership_changes_nothing(
    mesh: Mesh, broker: RunningBroker, registrar: Registrar
) -> None:
    """Someone with the registrar's broker rights (a stolen broker credential, a broker admin) publishes
    membership: unsigned, signed with another key, a replayed old snapshot signed by the registrar, a delta that
    skips revisions. Agents reject or ignore all of it; no tunnel changes."""
    for name in ("alpha", "beta", "gamma"):
        mesh.add(name)
    mesh.wait_complete()
    converged = mesh.snapshot()
    alpha = mesh.node("alpha").running
    revision = alpha.status().membership_revision
    real = Signer.from_pem((registrar.state_dir / "signing.key").read_bytes())
    registrar.kill()  # so nothing it publishes repairs what we inject
    only_alpha = [r for r in registrar_records(mesh) if r.node_id == alpha.node_id]
    with ProbeClient(broker, client_id="registrar", username="registrar", password=REGISTRAR_PASSWORD) as probe:
        snapshot_topic, delta_topic = topics.build(MESH, Kind.SNAPSHOT), topics.build(MESH, Kind.DELTA)
        forged = MembershipSnapshot(mesh=MESH, revision=revision + 50, members=only_alpha, published_at=time.time())
        probe.publish(snapshot_topic, messages.encode(forged), retain=True)  # unsigned
        probe.publish(snapshot_topic, messages.encode(signed(forged, Signer.generate(), "snapshot")), retain=True)
        replayed = MembershipSnapshot(mesh=MESH, revision=revision - 1, members=only_alpha, published_at=1.0)
        probe.publish(snapshot_topic, messages.encode(signed(replayed, real, "snapshot")), retain=True)
        beta = mesh.node("beta").running.node_id
        gap = MembershipDelta(
            mesh=MESH, from_revision=revision + 5, to_revision=revision + 6, removals=[beta], published_at=1.0
        )
        probe.publish(delta_topic, messages.encode(signed(gap, real, "delta")))
        wait_for(
            lambda: not alpha.status().membership_complete,
            timeout=10,
            what="alpha notices the gap and waits for a snapshot",
        )
    wait_for(mesh.reconciled_more(), timeout=10, what="reconcile passes after the injections")
    assert mesh.snapshot() == converged
    assert all(n.running.status().membership_revision == revision for n in mesh.running())


def signed(message, signer: Signer, kind: str):
    return message.model_copy(update={"sig": signer.sign(message, kind=kind, mesh=MESH)})


def registrar_records(mesh: Mesh) -> list:
    table = mesh.node("alpha").running.membership()
    assert table is not None
    return list(table.members.values())


def test_drift_is_repaired(mesh: Mesh) -> None:
    for name in ("alpha", "beta", "gamma"):
        mesh.add(name)
    mesh.wait_complete()
    alpha = mesh.nodes["alpha"]
    victim = next(iter(alpha.peers()))
    # Someone removes a peer by hand (`wg set meshvpn0 peer ... remove`): back within the reconcile interval.

    interface_id = alpha.wireguard.interface_id(IFNAME)
    alpha.wireguard.apply(IFNAME, PeerChanges(remove=(victim,)))
    assert victim not in alpha.peers()
    wait_for(lambda: victim in alpha.peers(), timeout=RECONCILE_S * 4 + 2, what="the removed peer comes back")
    assert alpha.wireguard.interface_id(IFNAME) == interface_id, "the interface was not recreated"
    mesh.wait_complete(timeout=5)

    # The whole interface deleted by hand (`ip link del meshvpn0`): recreated with its address, link and
    # every peer within the reconcile interval.
    converged = mesh.snapshot()
    alpha.wireguard.delete_interface(IFNAME)
    wait_for(
        lambda: IFNAME in alpha.wireguard.interfaces() and alpha.peers() == converged["alpha"],
        timeout=RECONCILE_S * 4 + 2,
        what="interface, address and peers restored",
    )
    assert alpha.routes.addresses(IFNAME) == [f"{alpha.agent.mesh_ip}/16"]  # type: ignore[union-attr]
    assert alpha.routes.link(IFNAME) == (True, 1420)


def test_a_refused_join_leaves_nothing_behind(mesh: Mesh) -> None:
    """A wrong token ends start-up with EnrollmentRefused (the CLI's exit 3) before anything exists on the
    machine: no interface, no peers, no broker connection."""
    mesh.token = "mvj_not-a-real-token-00000." + mesh.token.rsplit(".", 1)[1]  # a wrong secret, the right pin
    with pytest.raises(EnrollmentRefused) as refused:
        mesh.add("intruder")
    assert refused.value.code == "invalid_token"
    node = mesh.node("intruder")
    assert node.wireguard.interfaces() == [], "nothing was created"
    mesh.nodes.pop("intruder")


def test_a_token_for_another_registrar_is_refused_before_anything_is_sent(mesh: Mesh) -> None:
    """The token's CA pin does not match the registrar that answers: the agent stops without sending the token
    (it could be an impostor collecting tokens)."""
    secret = mesh.token.split(".")[0]
    mesh.token = f"{secret}.{'B' * 43}"
    with pytest.raises(EnrollmentRefused) as refused:
        mesh.add("misled")
    assert refused.value.code == "ca_mismatch"
    assert [n["name"] for n in mesh.registrar.nodes()] == [], "the registrar never saw an enrollment"
    mesh.nodes.pop("misled")


def test_embedded_broker_enrollment_then_own_credentials(tmp_path: Path) -> None:
    """With the registrar's own (TLS) broker: nodes enroll once with the token, then need it no more."""
    registrar = Registrar(None, tmp_path / "registrar", embedded_port=free_port())
    mesh: Mesh | None = None
    try:
        registrar.start()
        mesh = Mesh(tmp_path, registrar)
        for name in ("alpha", "beta"):
            mesh.add(name)
        mesh.wait_complete()
        alpha = mesh.node("alpha")
        state = alpha.settings.state_dir
        assert (state / "enrollment.json").exists() and (state / "ca.pem").exists()
        assert stat.S_IMODE((state / "broker_password").stat().st_mode) == 0o600
        # Restart without the join token or the registrar's URL: the stored credential is what gets alpha in.
        mesh.stop("alpha")
        alpha.settings = alpha.settings.model_copy(update={"join_token": None, "registrar_url": None})
        agent = mesh.start("alpha")
        wait_for(agent.registered.is_set, timeout=15, what="alpha registers with its own credential")
        mesh.wait_complete()
    finally:
        if mesh is not None:
            mesh.close()
        registrar.kill()


def test_a_lost_enrollment_reply_does_not_lock_the_node_out(tmp_path: Path) -> None:
    """The registrar admits a node but the reply never arrives (a crash right after sending): the agent retries
    with the same key and password and gets the same node id and mesh IP, although its single-use token is spent.
    A token holder still cannot take that identity."""
    registrar = Registrar(None, tmp_path / "registrar", embedded_port=free_port())
    mesh: Mesh | None = None
    try:
        registrar.start()
        single_use = registrar.create_token(reusable=False)
        # What the agent does before enrolling: identity and own password, on disk; then a request it never reads.
        state_dir = tmp_path / "nodes" / "lost"
        store = StateStore(state_dir)
        store.ensure_dir()
        node_id = store.node_id()
        request = EnrollRequest(
            node_id=node_id, name="lost", public_key=keys.public_key(store.private_key()), listen_port=51000,
            endpoints=[{"host": "127.0.0.1", "port": 51000}], token=single_use.split(".")[0],
            password=store.own_broker_password(),
        )  # fmt: skip
        first = httpx.post(f"{registrar.http_url}/v1/enroll", content=request.model_dump_json(), verify=registrar.tls())
        assert first.status_code == 200
        ip = first.json()["mesh_ip"]
        thief = request.model_copy(update={"password": "a-thief-guessed-nothing", "token": registrar.create_token()})
        stolen = httpx.post(f"{registrar.http_url}/v1/enroll", content=thief.model_dump_json(), verify=registrar.tls())
        assert stolen.status_code == 401, "a fresh token does not take over an enrolled identity"
        mesh = Mesh(tmp_path, registrar, single_use)
        node = mesh.add("lost")
        assert node.settings.state_dir == state_dir
        wait_for(node.running.registered.is_set, timeout=20, what="the agent gets in after the lost reply")
        assert node.running.node_id == node_id and node.running.mesh_ip == ip
    finally:
        if mesh is not None:
            mesh.close()
        registrar.kill()


def test_rotate_key_keeps_the_ip_and_touches_no_other_pair(mesh: Mesh) -> None:
    for name in ("alpha", "beta", "gamma"):
        mesh.add(name)
    mesh.wait_complete()
    alpha = mesh.node("alpha")
    old_key, ip = alpha.running.public_key, alpha.running.mesh_ip
    key_file = alpha.settings.state_dir / "private.key"
    for node in mesh.running():
        node.wireguard.clear_operations()

    rotated = alpha.running.handle_local(LocalRequest(op="rotate-key"), caller_uid=os.getuid())

    assert rotated.ok and rotated.rotated is not None, rotated.error
    new_key = rotated.rotated.public_key
    assert rotated.rotated.confirmed and rotated.rotated.previous_public_key == old_key and new_key != old_key
    assert rotated.rotated.mesh_ip == ip == alpha.running.mesh_ip
    assert keys.public_key(keys.read_private_key(key_file)) == new_key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # alpha's interface uses the new key at once; every peer swaps alpha's key for the new one, same IP
    assert alpha.wireguard.read(IFNAME).public_key == new_key
    mesh.wait_complete()
    for other in ("beta", "gamma"):
        peers = mesh.node(other).peers()
        assert peers.get(new_key) == (f"{ip}/32",) and old_key not in peers
    # the registrar has it too, and nothing between beta and gamma was touched
    assert {n["node_id"]: n["public_key"] for n in mesh.registrar.nodes()}[alpha.running.node_id] == new_key
    beta, gamma = mesh.node("beta"), mesh.node("gamma")
    assert not [op for op in beta.wireguard.operations if op.peer == gamma.running.public_key]
    assert not [op for op in gamma.wireguard.operations if op.peer == beta.running.public_key]

    # a restart keeps the new key (and the IP); the mesh stays complete
    mesh.stop("alpha")
    agent = mesh.start("alpha")
    wait_for(lambda: agent.registered.is_set(), timeout=20, what="alpha registered again")
    assert agent.public_key == new_key and agent.mesh_ip == ip
    mesh.wait_complete()


def test_rotate_key_refused_while_the_control_plane_is_away_changes_nothing(mesh: Mesh) -> None:
    mesh.add("alpha")
    mesh.add("beta")
    mesh.wait_complete()
    alpha = mesh.node("alpha")
    before = alpha.running.public_key
    mesh.registrar.kill()
    wait_for(lambda: not alpha.running.status().registrar_online, timeout=20, what="alpha sees the registrar gone")

    refused = alpha.running.handle_local(LocalRequest(op="rotate-key"), caller_uid=os.getuid())

    assert not refused.ok and "unchanged" in (refused.error or "")
    assert alpha.running.public_key == before
    assert keys.public_key(keys.read_private_key(alpha.settings.state_dir / "private.key")) == before
    assert alpha.wireguard.read(IFNAME).public_key == before
