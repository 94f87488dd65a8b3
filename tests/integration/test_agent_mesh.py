"""Agents, a real registrar and a real broker: the mesh converges and survives failures.

The harness (tests/harness.py) runs the registrar as a subprocess so it can be killed and restarted, a real
broker of each kind (tests/brokers.py), and the agents in this process on the in-memory WireGuard backend.
"""

from __future__ import annotations

import time
from pathlib import Path

from brokers import ProbeClient, RunningBroker, free_port
from harness import HEARTBEAT_S, IFNAME, MESH, RECONCILE_S, TTL_S, Mesh, Registrar
from polling import wait_for

from meshcontract import messages, topics
from meshcontract.access import JOIN_PASSWORD_PREFIX
from meshcontract.messages import RegisterRequest, Roster, RosterEntry
from meshcontract.topics import Kind
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


def test_stale_or_partial_views_remove_nothing(
    mesh: Mesh, broker: RunningBroker, registrar: Registrar
) -> None:
    for name in ("alpha", "beta", "gamma"):
        mesh.add(name)
    mesh.wait_complete()
    converged = mesh.snapshot()
    revision = mesh.nodes["alpha"].agent.status().membership_revision  # type: ignore[union-attr]
    registrar.kill()  # so nothing it publishes repairs what we inject
    roster_topic = topics.build(MESH, Kind.ROSTER)
    with ProbeClient(broker, client_id="it-injector") as probe:
        probe.connect()
        # A stale roster (lower revision) listing only alpha: must be ignored.
        stale = Roster(
            mesh=MESH,
            revision=max(0, revision - 1),
            members=[RosterEntry(node_id="x", revision=0)],
            published_at=time.time(),
        )
        probe.publish(roster_topic, messages.encode(stale), qos=1)
        # A newer roster naming a member nobody has a record of: the view is partial, nothing may go.
        partial = Roster(
            mesh=MESH,
            revision=revision + 100,
            members=[RosterEntry(node_id="ghost", revision=revision + 100)],
            published_at=time.time(),
        )
        probe.publish(roster_topic, messages.encode(partial), qos=1)
        # A tombstone for beta without a roster that drops it: partial again.
        beta = mesh.nodes["beta"].agent.node_id  # type: ignore[union-attr]
        probe.publish(topics.build(MESH, Kind.MEMBERS, beta), b"", qos=1, retain=True)
        wait_for(
            lambda: not mesh.nodes["alpha"].agent.status().membership_complete,
            timeout=5,  # type: ignore[union-attr]
            what="alpha sees an incomplete view",
        )
    wait_for(mesh.reconciled_more(), timeout=10, what="reconcile passes on the partial view")
    assert mesh.snapshot() == converged


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


def test_refused_registration_stops_with_exit_code_3(mesh: Mesh) -> None:
    mesh.token = "not-a-real-token"
    agent = mesh.add("intruder").agent
    assert agent is not None
    assert agent.wait(timeout=15), "a refused agent stops by itself"
    assert agent.exit_code == 3
    assert agent.failure is not None and agent.failure.code in ("invalid_token", "invalid_request")


def test_embedded_broker_join_token_then_own_credentials(tmp_path: Path) -> None:
    """The registrar's embedded broker enforces the access rules: a new node logs in with "join:<token>" and
    registers its own broker password (generated and stored 0600 before connecting), used from then on."""
    port = free_port()
    registrar = Registrar(None, tmp_path / "registrar", embedded_port=port)
    mesh = Mesh(tmp_path, f"mqtt://127.0.0.1:{port}", "")
    try:
        registrar.start()
        mesh.token = registrar.create_token()
        for name in ("alpha", "beta"):
            mesh.add(name)
        mesh.wait_complete()
        alpha = mesh.nodes["alpha"]
        password_file = alpha.settings.state_dir / "broker_password"
        assert password_file.read_text().strip(), "the agent created its own broker password"
        assert (alpha.settings.state_dir / "broker_password.accepted").exists()
        # Restart without the join token: the stored password is what gets alpha in now.
        mesh.stop("alpha")
        alpha.settings = alpha.settings.model_copy(update={"join_token": None})
        agent = mesh.start("alpha")
        wait_for(agent.registered.is_set, timeout=15, what="alpha registers with its issued password")
        mesh.wait_complete()
    finally:
        mesh.close()
        registrar.kill()


def test_lost_register_reply_does_not_lock_the_node_out(tmp_path: Path) -> None:
    """A node's RegisterRequest is admitted but the reply never reaches it (it disconnects right after
    publishing, as if it crashed): a restarted agent still gets in, with the same node id and mesh IP, using
    the password it stored before connecting; its single-use token is spent and not needed. A token holder
    still cannot log in as that node."""
    port = free_port()
    registrar = Registrar(None, tmp_path / "registrar", embedded_port=port)
    url = f"mqtt://127.0.0.1:{port}"
    mesh = Mesh(tmp_path, url, "")
    try:
        registrar.start()
        single_use = registrar.cli("tokens", "create").splitlines()[-1].strip()
        # What the agent does before its first connection: identity and own password, on disk.
        state_dir = tmp_path / "nodes" / "lost"
        store = StateStore(state_dir)
        store.ensure_dir()
        node_id = store.node_id()
        own = store.own_broker_password()
        request = RegisterRequest(
            request_id="lost-reply-1",
            node_id=node_id,
            name="lost",
            public_key=keys.public_key(store.private_key()),
            listen_port=51820,
            join_token=single_use,
            epoch=1,
            broker_password=own,
        )
        with ProbeClient(url, client_id=node_id, username=node_id, password=JOIN_PASSWORD_PREFIX + single_use) as c:
            assert c.rc == 0
            c.publish(topics.build(MESH, Kind.REGISTER, node_id), messages.encode(request))  # never reads a reply
        passwords = registrar.state_dir / "passwords"
        wait_for(
            lambda: f"{node_id}:" in passwords.read_text(), timeout=15, what="the registrar stored the password"
        )
        with ProbeClient(url, client_id=node_id, username=node_id, password=own) as me:
            assert me.rc == 0, "the node's own password works although it never saw the reply"
            me.subscribe(topics.subscription(MESH, Kind.MEMBERS))
            record = messages.decode(
                messages.MemberRecord, me.expect(topics.build(MESH, Kind.MEMBERS, node_id), timeout=15).payload
            )
        # The hardening still holds: a fresh, valid token does not open the broker for an existing entry.
        other = registrar.cli("tokens", "create").splitlines()[-1].strip()
        with ProbeClient(url, client_id=node_id, username=node_id, password=JOIN_PASSWORD_PREFIX + other) as thief:
            assert thief.rc != 0, "a token holder logged in as an existing member"
        # The agent restarts with no record of the reply: it tries the token first (refused: an entry exists),
        # then its own password, and registers as the same node with the same IP.
        mesh.token = single_use
        node = mesh.add("lost")
        assert node.settings.state_dir == state_dir
        agent = node.agent
        assert agent is not None
        wait_for(agent.registered.is_set, timeout=20, what="the agent gets in after the lost reply")
        assert agent.node_id == node_id and agent.mesh_ip == record.mesh_ip
        assert (state_dir / "broker_password.accepted").exists()
        assert store.broker_password() == own
    finally:
        mesh.close()
        registrar.kill()
