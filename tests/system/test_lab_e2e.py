"""End to end: a lab of 4 real agents with wireguard-go in network namespaces, and real failures.

One lab per module (building it is the slow part); the tests run in file order and each leaves the mesh
complete for the next. Every wait has a deadline. Heartbeat 1 s, TTL 3 s: removals take seconds.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import sys
import time

import pytest
from netns import lab_missing

from meshlab.checkloop import describe, settle
from meshlab.errors import NotReadyError
from meshlab.invariants import Bounds, Memory
from meshlab.lab import Lab, new_lab_id
from meshlab.meshview import holders_of
from meshlab.settings import LabSettings
from meshlab.waiting import wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

NODES = ["n1", "n2", "n3", "n4"]
REMOVAL_DEADLINE = 20.0  # TTL 3 s + registrar publish + agent reconcile, with room for a loaded machine
JOIN_DEADLINE = 30.0


def _missing() -> str | None:
    return lab_missing("ip", "ss", "wireguard-go", "wg", "ping")


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def lab(request, tmp_path_factory):
    reason = _missing()
    if not reason and request.param == "mosquitto" and shutil.which("mosquitto") is None:
        reason = "mosquitto not installed (scripts/bootstrap installs it)"
    if reason:
        print(f"skipping the lab end-to-end tests: {reason}")
        pytest.skip(reason)
    settings = LabSettings(lab_dir=tmp_path_factory.mktemp("lab"), broker=request.param,
                           heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0, join_timeout_s=JOIN_DEADLINE)
    lab = Lab(settings, report=lambda line: print(f"[lab] {line}"))
    lab_id = new_lab_id()
    try:
        lab.up(len(NODES), lab_id=lab_id)
        yield lab
    finally:
        lab.down()
        assert not [ns for ns in _namespaces() if ns.startswith(f"ml{lab_id}-")], "down left namespaces"


@pytest.fixture(autouse=True)
def complete_mesh(lab):
    """Each test starts from a complete mesh: whatever an earlier failure left is repaired first."""
    from meshlab import system

    st = lab.state()
    if system.record_state(st.control.registrar) == "stopped":
        lab.registrar("start")
    if st.broker == "mosquitto" and system.record_state(st.control.broker) == "stopped":
        lab.broker("start")
    for node in st.ordered_nodes():
        if node.partitioned:
            lab.heal(node.name)
        state = system.record_state(node.agent)
        if state == "frozen":
            lab.thaw(node.name)
        elif state == "stopped":
            lab.start(node.name)
    lab.wait_mesh([n.name for n in lab.state().ordered_nodes()], timeout=JOIN_DEADLINE)
    assert_invariants(lab)
    yield


def assert_invariants(lab: Lab) -> None:
    """Every invariant of meshlab.invariants holds (the one-shot `meshlab check`): what the previous test left,
    and its repair, is a consistent mesh, not only a complete one."""
    st = lab.state()
    bounds = Bounds.for_lab(interval_s=st.heartbeat_interval_s, ttl_s=st.heartbeat_ttl_s)
    verdict, _ = settle(lab, bounds=bounds, memory=Memory(), limit_s=bounds.settle_s + 10)
    assert verdict.ok and not verdict.pending, [describe(f) for f in verdict.violations + verdict.pending]


def _namespaces() -> list[str]:
    from meshlab.system import list_namespaces

    return list_namespaces()


def _assert_removed_everywhere(lab: Lab, victim_ip: str, others: list[str]) -> float:
    return wait_for(lambda: not holders_of(lab.views(others), victim_ip, among=others), timeout=REMOVAL_DEADLINE,
                    what=f"every peer drops the tunnel to {victim_ip}")


def _assert_back(lab: Lab, name: str, ip: str) -> None:
    assert lab.mesh_ip(name) == ip, f"{name} came back with {lab.mesh_ip(name)}, had {ip}"
    lab.wait_mesh(lab.running_nodes(), timeout=JOIN_DEADLINE)


def test_join_every_pair_pings_and_connects(lab):
    lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)
    ips = [lab.mesh_ip(n) for n in NODES]
    assert len(set(ips)) == len(NODES), f"mesh IPs not unique: {ips}"
    failures = []
    for src in NODES:
        for dst in NODES:
            if src == dst:
                continue
            # The first packet of a pair may wait for its WireGuard handshake: poll with a deadline.
            try:
                wait_for(lambda s=src, d=dst: lab.ping(s, d), timeout=10, what=f"ping {src}->{dst}", interval=0.1)
                wait_for(lambda s=src, d=dst: lab.tcp(s, d), timeout=10, what=f"tcp {src}->{dst}", interval=0.1)
            except NotReadyError as exc:  # collect every failing pair before failing once
                failures.append(str(exc))
    assert not failures, failures


def test_agent_restart_with_tunnels_up_changes_nothing(lab):
    before = lab.wg_peers("n1")
    pinger = lab.start_pinger("n2", "n3")
    try:
        lab.kill("n1")
        # wireguard-go outlives its agent: the interface still holds every tunnel, and n1 still answers over the
        # mesh, so the others vouch for it and keep their tunnels (control_lost) until its agent is back.
        assert sorted(lab.wg_peers("n1")) == sorted(before)
        lab.start("n1")
        lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)
    finally:
        sent, received = pinger.stop()
    assert sorted(lab.wg_peers("n1")) == sorted(before)
    # Re-applying the same configuration is a no-op: the restarted agent adopts its tunnels, removes none.
    status = lab.agent_status("n1")
    assert status is not None, "n1's agent does not answer after its restart"
    assert status.counters.get("peer_removed", 0) == 0, status.counters  # counted since this agent started
    assert sent > 0 and received == sent, f"n2->n3 lost {sent - received}/{sent} during n1's restart"


def _wg_peer_keys(lab: Lab, name: str) -> set[str]:
    """The public keys of node `name`'s WireGuard peers, as wireguard-go holds them."""
    interface = lab.state().nodes[name].interface
    proc = lab.exec(name, ["wg", "show", interface, "peers"], timeout=10)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_rotate_key_is_swapped_everywhere_and_loses_nothing_between_others(lab):
    ip = lab.mesh_ip("n1")
    others = ["n2", "n3", "n4"]
    pinger = lab.start_pinger("n2", "n3")
    try:
        done = lab.exec("n1", [sys.executable, "-m", "nodeagent.meshctl", "rotate-key", "--json"], timeout=60)
        assert done.returncode == 0, done.stderr
        rotated = json.loads(done.stdout)
        new, old = rotated["public_key"], rotated["previous_public_key"]
        assert rotated["confirmed"] and rotated["mesh_ip"] == ip and new != old
        wait_for(lambda: all(new in (keys := _wg_peer_keys(lab, n)) and old not in keys for n in others),
                 timeout=JOIN_DEADLINE, what="every peer holds n1's new key, not the old one")  # fmt: skip
        for src in others:
            wait_for(lambda s=src: lab.ping(s, "n1"), timeout=10, what=f"ping {src}->n1 with the new key")
        assert lab.mesh_ip("n1") == ip
    finally:
        sent, received = pinger.stop()
    assert sent > 0 and received == sent, f"n2->n3 lost {sent - received}/{sent} while n1 rotated its key"


def _state_seen_by(lab: Lab, observer: str, name: str) -> str | None:
    """Node `name`'s membership state as `observer`'s agent shows it (`meshctl status`)."""
    status = lab.agent_status(observer)
    node_id = lab.state().nodes[name].node_id
    return next((p.state for p in status.peers if p.node_id == node_id), None) if status else None


def test_a_node_that_loses_only_the_control_plane_keeps_its_tunnels(lab):
    """Its broker and registrar are cut off (nftables in its namespace), its tunnels are not: peers vouch for it,
    it shows as "control_lost" on their status, and no tunnel to it is removed; healed, it is active again."""
    victim, others = "n4", ["n1", "n2", "n3"]
    ip = lab.mesh_ip(victim)
    underlay = lab.state().nodes[victim].underlay_ip
    control = str(ipaddress.ip_network(f"{underlay}/24", strict=False)[1])
    cut = [
        ["nft", "add", "table", "inet", "mlcut"],
        ["nft", "add", "chain", "inet", "mlcut", "out", "{ type filter hook output priority 0 ; }"],
        ["nft", "add", "rule", "inet", "mlcut", "out", "ip", "daddr", control, "drop"],
        ["nft", "add", "chain", "inet", "mlcut", "in", "{ type filter hook input priority 0 ; }"],
        ["nft", "add", "rule", "inet", "mlcut", "in", "ip", "saddr", control, "drop"],
    ]
    pinger = lab.start_pinger("n1", victim)
    try:
        for argv in cut:
            done = lab.exec(victim, argv, timeout=10)
            assert done.returncode == 0, done.stderr
        wait_for(lambda: all(_state_seen_by(lab, o, victim) == "control_lost" for o in others), timeout=30,
                 what=f"{victim} control_lost on every peer's status")  # fmt: skip
        until = time.monotonic() + 10  # the window is the scenario: vouches renewed, nothing removed
        while time.monotonic() < until:
            assert holders_of(lab.views(others), ip, among=others) == others, "a vouched tunnel was removed"
            time.sleep(0.5)
    finally:
        lab.exec(victim, ["nft", "delete", "table", "inet", "mlcut"], timeout=10)
        sent, received = pinger.stop()
    assert sent > 0 and received == sent, f"n1->{victim} lost {sent - received}/{sent} while only control was cut"
    wait_for(lambda: all(_state_seen_by(lab, o, victim) == "active" for o in others), timeout=JOIN_DEADLINE,
             what=f"{victim} active again once its control plane is back")  # fmt: skip


def test_graceful_stop_removes_tunnel_everywhere(lab):
    ip = lab.mesh_ip("n4")
    lab.stop("n4")
    _assert_removed_everywhere(lab, ip, ["n1", "n2", "n3"])
    assert not lab.mesh_problems(["n1", "n2", "n3"])
    lab.start("n4")
    _assert_back(lab, "n4", ip)


def test_crash_removes_and_restart_keeps_ip(lab):
    ip = lab.mesh_ip("n3")
    lab.crash("n3")
    took = _assert_removed_everywhere(lab, ip, ["n1", "n2", "n4"])
    print(f"crash -> removed everywhere in {took:.1f} s")
    assert not lab.ping("n1", "n3")
    lab.start("n3")
    _assert_back(lab, "n3", ip)
    assert lab.mesh_problems(NODES) == []  # no ghost of the old incarnation, no duplicate
    assert_invariants(lab)


def test_freeze_removes_and_thaw_returns(lab):
    ip = lab.mesh_ip("n2")
    lab.freeze("n2")
    try:
        _assert_removed_everywhere(lab, ip, ["n1", "n3", "n4"])
    finally:
        lab.thaw("n2")
    _assert_back(lab, "n2", ip)
    assert lab.agent_status("n2").mesh_ip == ip


def test_partition_removes_and_heal_returns(lab):
    ip = lab.mesh_ip("n4")
    lab.partition("n4")
    try:
        _assert_removed_everywhere(lab, ip, ["n1", "n2", "n3"])
    finally:
        lab.heal("n4")
    _assert_back(lab, "n4", ip)
    assert lab.agent_status("n4").mesh_ip == ip


def test_control_plane_outage_keeps_data_plane(lab):
    st = lab.state()
    outage = 3 * st.heartbeat_ttl_s
    pingers = [lab.start_pinger("n1", "n2"), lab.start_pinger("n2", "n3")]
    try:
        lab.registrar("stop")  # with the embedded broker, the broker goes too
        if st.broker == "mosquitto":
            lab.broker("stop")
        deadline = time.monotonic() + outage
        # A machine that crashes and comes back during the outage (wireguard-go and its interface gone): its
        # agent restores the tunnels from its persisted membership, without any control plane.
        lab.crash("n4")
        lab.start("n4", wait=False)
        wait_for(lambda: lab.mesh_problems(NODES) == [], timeout=20, what="n4's tunnels restored during the outage")
        assert lab.exec("n1", ["ping", "-c", "1", "-W", "2", lab.mesh_ip("n4")]).returncode == 0
        # The outage itself is the scenario: while it lasts, the mesh must stay complete.
        stays_complete(lab, until=deadline, why="a tunnel was removed while the control plane was down")
        if st.broker == "mosquitto":
            lab.broker("start")
        lab.registrar("start")
        # Back: nobody may be removed while heartbeats resume (the registrar's grace period).
        stays_complete(lab, until=time.monotonic() + 2 * st.heartbeat_ttl_s + 2,
                       why="a tunnel was removed after the control plane returned")
    finally:
        if st.broker == "mosquitto":
            lab.broker("start")
        lab.registrar("start")
        results = [p.stop() for p in pingers]
    for sent, received in results:
        assert sent > 0 and received == sent, f"lost {sent - received}/{sent} during the outage"
    wait_for(lambda: all((s := lab.agent_status(n)) is not None and s.registrar_online for n in NODES), timeout=20,
             what="agents see the registrar again")


@pytest.mark.parametrize("part", ["broker", "registrar"])
def test_one_part_of_the_control_plane_down_keeps_data_plane(lab, part):
    """Mosquitto and the registrar are separate processes: each may go down alone. Stopping Mosquitto publishes
    every client's will, possibly to the registrar just before it is dropped; none of it may cost a tunnel."""
    st = lab.state()
    if st.broker != "mosquitto":
        pytest.skip("with the embedded broker the broker is part of the registrar: see the test above")
    control = lab.broker if part == "broker" else lab.registrar
    before = tunnels_removed(lab)
    pingers = [lab.start_pinger("n1", "n2"), lab.start_pinger("n3", "n4")]
    try:
        control("stop")
        stays_complete(lab, until=time.monotonic() + 2 * st.heartbeat_ttl_s,
                       why=f"a tunnel was removed while the {part} was down")
        control("start")
        stays_complete(lab, until=time.monotonic() + 2 * st.heartbeat_ttl_s + 2,
                       why=f"a tunnel was removed after the {part} returned")
    finally:
        control("start")
        results = [p.stop() for p in pingers]
    for sent, received in results:
        assert sent > 0 and received == sent, f"lost {sent - received}/{sent} while the {part} was down"
    wait_for(lambda: all((s := lab.agent_status(n)) is not None and s.registrar_online for n in NODES), timeout=20,
             what="agents see the registrar again")
    # Also a flap shorter than the polling above: no agent removed a tunnel at all.
    assert tunnels_removed(lab) == before, f"an agent removed a tunnel while the {part} was down or after"


def stays_complete(lab, *, until: float, why: str) -> None:
    """The scenario is the time window itself: until `until`, every check finds the mesh of NODES complete."""
    while time.monotonic() < until:
        assert lab.mesh_problems(NODES) == [], why
        time.sleep(0.3)


def tunnels_removed(lab) -> int:
    """How many peers the agents of NODES have removed from their interfaces since they started (local API)."""
    total = 0
    for name in NODES:
        status = lab.agent_status(name)
        assert status is not None, f"{name}'s agent does not answer"
        total += status.counters.get("peer_removed", 0)
    return total


def test_reconfiguration_under_traffic_loses_nothing(lab):
    pinger = lab.start_pinger("n1", "n2")
    try:
        ip = lab.mesh_ip("n3")
        lab.stop("n3")
        _assert_removed_everywhere(lab, ip, ["n1", "n2", "n4"])
        lab.start("n3")
        lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)
        new = lab.add()
        lab.wait_mesh([*NODES, new.name], timeout=JOIN_DEADLINE)
        assert lab.ping("n1", new.name) or lab.ping("n1", new.name, count=3)
    finally:
        sent, received = pinger.stop()
    assert sent > 0 and received == sent, f"n1->n2 lost {sent - received}/{sent} while n3 left/joined and n5 joined"
