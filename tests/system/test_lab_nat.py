"""NAT topologies in the lab: nodes behind routers of their own and behind a shared one, roaming, and `down`.

One lab for the module (embedded broker: the underlay does not depend on the broker): n1 public, n2 and n3
each behind a NAT router of their own, n4 and n5 behind one shared router (NAT group "home"). The tests check
the topology the way a network engineer would: addresses and routes inside the namespaces, the control plane
seeing every NATed node only from its router's address, private addresses unreachable from outside, the
masquerade counters. Then the agents' part (endpoint candidates, issue 12): every ordered pair reaches each other
over the mesh (public <-> NATed, two NATs of their own, two nodes behind one NAT), and keeps doing so with zero loss
through several drift-repair passes (an agent must never write an advertised endpoint over one WireGuard learned
from a NATed peer's handshake). The roaming tests run last (they change the topology) and end with every pair
reaching each other again; the module ends with `down` and a check that nothing is left.
"""

from __future__ import annotations

import ipaddress
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from netns import lab_missing

from meshlab import system
from meshlab.errors import NotReadyError
from meshlab.lab import Lab, new_lab_id
from meshlab.plan import BROKER_PORT, UNDERLAY_IF
from meshlab.settings import LabSettings
from meshlab.snapshot import Leftovers
from meshlab.survey import leftovers
from meshlab.traffic import PROBE_PORT
from meshlab.waiting import wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

NODES = ["n1", "n2", "n3", "n4", "n5"]
JOIN_DEADLINE = 30.0
REACH_DEADLINE = 30.0  # every ordered pair pings and connects within this, once agents advertise NAT-friendly endpoints
# A roamed agent's broker connection is stuck on an address it no longer has until MQTT keepalive (10 s) gives up.
RECONNECT_DEADLINE = 60.0
# Pings (0.2 s apart) a roam may cost: the path is back once the roamer's agent notices its new address (a check
# every 3 s) and sets its peers' endpoints again, so that wireguard-go sends from the new address (measured 11 of
# 32 lost); at the latest when wireguard-go itself gives up the old source address (15 s without an answer).
ROAM_LOSS_BOUND = 150
EXPIRY_S = 600.0
# The agents' drift repair runs every 10 s (reconcile_interval_s): watch until every agent ran this many passes.
DRIFT_PASSES = 6  # about 60 s
DRIFT_DEADLINE = 150.0


def _missing() -> str | None:
    return lab_missing("ip", "ss", "nft", "sysctl", "wireguard-go", "wg", "ping")


def _new_lab(prefix: str) -> Lab:
    # Short on purpose: agent sockets live in the lab directory and unix socket paths are limited.
    lab_dir = Path(tempfile.mkdtemp(prefix=prefix))
    return Lab(LabSettings(lab_dir=lab_dir, broker="embedded", join_timeout_s=JOIN_DEADLINE, expiry_s=EXPIRY_S),
               report=lambda line: print(f"[lab] {line}"))


@pytest.fixture(scope="module")
def lab():
    reason = _missing()
    if reason:
        print(f"skipping the lab NAT tests: {reason}")
        pytest.skip(reason)
    lab = _new_lab("mln-")
    lab_id = new_lab_id()
    try:
        lab.up(len(NODES), lab_id=lab_id, nat=["n2", "n3"], nat_groups=[("home", ["n4", "n5"])])
        yield lab
    finally:
        lab.down(lab_id=lab_id)
        shutil.rmtree(lab.store.root, ignore_errors=True)



def _broker_peers(lab: Lab) -> Counter[str]:
    """Source addresses of the established connections to the broker, as the control namespace sees them."""
    st = lab.state()
    out = system.run(system.ns_argv(st.control.namespace,
                                    ["ss", "-Htn", "state", "established", f"( sport = :{BROKER_PORT} )"])).stdout
    peers = Counter(line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip())
    peers.pop(lab.plan(st).control_ip, None)  # the registrar's own client of its embedded broker
    return peers


def _addresses(lab: Lab, name: str) -> list[str]:
    out = system.run(["ip", "-n", lab.node(name).namespace, "-4", "-o", "addr", "show", "dev", UNDERLAY_IF]).stdout
    return [line.split()[3] for line in out.splitlines()]


def _default_route(lab: Lab, name: str) -> str:
    return system.run(["ip", "-n", lab.node(name).namespace, "route", "show", "default"]).stdout.strip()


def _pings(lab: Lab, src: str, address: str) -> bool:
    return lab.exec(src, ["ping", "-n", "-q", "-c", "1", "-W", "1", address], timeout=10).returncode == 0


def test_nodes_sit_where_they_were_put(lab):
    st = lab.state()
    assert {r.name: (r.group, [n.name for n in st.behind(r.name)]) for r in st.ordered_routers()} == {
        "r1": (None, ["n2"]), "r2": (None, ["n3"]), "r3": ("home", ["n4", "n5"])}
    assert st.node("n1").router is None
    for name in NODES:
        record = st.node(name)
        gateway = st.routers[record.router].gateway if record.router else lab.plan(st).control_ip
        assert _addresses(lab, name) == [f"{record.underlay_ip}/24"], name
        assert _default_route(lab, name).startswith(f"default via {gateway} dev {UNDERLAY_IF}"), name
    for router in st.ordered_routers():
        subnet = ipaddress.ip_network(router.private_subnet)
        assert all(ipaddress.ip_address(n.underlay_ip) in subnet for n in st.behind(router.name)), router.name
    rows = {row.name: row for row in lab.rows()}
    assert (rows["n4"].router, rows["n4"].router_ip) == ("r3", st.routers["r3"].lan_ip)
    assert rows["n1"].router is None
    assert all(row.mesh_ip for row in rows.values())


def test_the_registrar_runs_with_the_labs_expiry(lab):
    argv = lab.state().control.registrar.argv
    assert argv[argv.index("--expiry") + 1] == str(EXPIRY_S)


def test_the_control_plane_sees_natted_nodes_only_from_their_routers(lab):
    st = lab.state()
    routers = st.routers
    expected = Counter({st.node("n1").underlay_ip: 1, routers["r1"].lan_ip: 1, routers["r2"].lan_ip: 1,
                        routers["r3"].lan_ip: 2})
    seen: Counter[str] = Counter()

    def as_expected() -> bool:
        nonlocal seen
        seen = _broker_peers(lab)
        return seen == expected

    try:
        wait_for(as_expected, timeout=JOIN_DEADLINE, what="one broker connection per node, from its NAT")
    except NotReadyError:
        pytest.fail(f"broker connections from {dict(seen)}, expected {dict(expected)}")
    assert not [peer for peer in seen if peer.startswith("192.168.")]
    assert all(lab.masqueraded(name) > 0 for name in routers), {name: lab.masqueraded(name) for name in routers}


def test_private_addresses_are_reachable_only_on_their_own_lan(lab):
    st = lab.state()
    n2, n4, n5 = (st.node(n).underlay_ip for n in ("n2", "n4", "n5"))
    assert _pings(lab, "n4", n5), "n4 and n5 share a private LAN behind r3"
    assert not _pings(lab, "n1", n2), "a public node reached a private address"
    assert not _pings(lab, "n3", n4), "a node behind one NAT reached a private address behind another"
    assert _pings(lab, "n2", st.node("n1").underlay_ip), "a NATed node cannot reach a public one"


def test_every_ordered_pair_reaches_each_other_over_the_mesh(lab):
    lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)
    matrix = lab.reachability(NODES, timeout_s=REACH_DEADLINE)
    print(f"reachability: {matrix.as_dict()}")
    assert matrix.ok(), f"not within {REACH_DEADLINE:.0f} s: {matrix.failures()}"


# public <-> behind a NAT, two NATs of their own, and the LAN path behind one shared NAT.
STABLE_PAIRS = [("n2", "n1"), ("n1", "n3"), ("n2", "n3"), ("n4", "n5"), ("n3", "n4")]


def test_paths_through_nats_lose_nothing_across_drift_repairs(lab):
    lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)
    assert lab.reachability(NODES, tcp=False, timeout_s=REACH_DEADLINE).ok(), "the mesh is not whole to begin with"
    def passes() -> dict[str, int]:
        statuses = {name: lab.agent_status(name) for name in NODES}
        return {name: s.counters.get("reconcile_passes", 0) if s is not None else -1 for name, s in statuses.items()}

    before = passes()
    started = time.monotonic()
    pingers = [(src, dst, lab.start_pinger(src, dst, interval_s=0.2)) for src, dst in STABLE_PAIRS]
    try:
        wait_for(lambda: all(n >= before[name] + DRIFT_PASSES for name, n in passes().items()),
                 timeout=DRIFT_DEADLINE, interval=1.0,
                 what=f"{DRIFT_PASSES} reconcile passes on every agent while the pings run")
    finally:
        results = {(src, dst): pinger.stop() for src, dst, pinger in pingers}
    took = time.monotonic() - started
    print(f"ping (sent, received) over {took:.0f} s and {DRIFT_PASSES}+ repair passes per agent: {results}")
    for pair, (sent, received) in results.items():
        assert sent >= 10, f"{pair}: ping sent only {sent} in {took:.0f} s"
        assert received == sent, f"{pair}: {sent - received} of {sent} lost"


class _HeldConnection:
    """`meshlab.probe hold` from `src` to `dst`'s echo probe over the mesh: one TCP connection kept busy."""

    def __init__(self, lab: Lab, src: str, dst: str, log: Path) -> None:
        argv, env = lab.traffic.command(src, [sys.executable, "-m", "meshlab.probe", "hold", lab.node(dst).mesh_ip,
                                              str(PROBE_PORT), "--interval", "0.2", "--timeout", "120"])
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def echoed(self) -> int:
        lines = [ln for ln in self.log.read_text().splitlines() if ln.startswith("echoed ")]
        return int(lines[-1].split()[1]) if lines else 0

    def stop(self) -> tuple[int | None, str]:
        """(exit status, last line): 0 and `held N` if the connection lived to the end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=130)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        lines = self.log.read_text().splitlines()
        return self.proc.returncode, lines[-1] if lines else ""


def test_roam_behind_a_new_nat_keeps_agent_mesh_ip_and_connections(lab, tmp_path):
    before = lab.node("n2")
    assert before.agent is not None and before.mesh_ip is not None
    old_router = before.router
    # The roaming node is the one talking (a laptop's chat client and ping): its first packet from the new
    # address is what tells the peer where it went (WireGuard roaming).
    held = _HeldConnection(lab, "n2", "n1", tmp_path / "hold.log")
    pinger = lab.start_pinger("n2", "n1", interval_s=0.2)
    try:
        wait_for(lambda: held.echoed() >= 5, timeout=REACH_DEADLINE, what="the held connection n2->n1 carries lines")
        after = lab.roam("n2")
        at_roam = held.echoed()
        took = wait_for(lambda: held.echoed() >= at_roam + 10 or held.proc.poll() is not None,
                        timeout=RECONNECT_DEADLINE, what="the held connection n2->n1 carries lines again after the roam")
    finally:
        sent, received = pinger.stop()
        status, last = held.stop()
    print(f"roam of n2: ping n2->n1 lost {sent - received} of {sent} (0.2 s apart); held connection: {last}, "
          f"10 more lines echoed {took:.1f} s after the roam")
    assert status == 0 and last.startswith("held "), f"the TCP connection across the roam broke: {last}"
    assert sent - received <= ROAM_LOSS_BOUND, f"{sent - received} of {sent} pings lost across the roam"
    st = lab.state()
    assert after.router not in (None, old_router) and st.routers[after.router].group is None
    assert _addresses(lab, "n2") == [f"{after.underlay_ip}/24"] != [f"{before.underlay_ip}/24"]
    assert _default_route(lab, "n2").startswith(f"default via {st.routers[after.router].gateway} ")
    assert old_router in st.routers, "the network the node left is still there (roam back with --to)"
    assert system.record_state(after.agent) == "running" and after.agent.pid == before.agent.pid
    new_lan_ip = st.routers[after.router].lan_ip
    wait_for(lambda: _broker_peers(lab)[new_lan_ip] >= 1, timeout=RECONNECT_DEADLINE,
             what=f"n2's agent reaches the broker through {after.router}")
    wait_for(lambda: (s := lab.agent_status("n2")) is not None and s.mesh_ip == before.mesh_ip,
             timeout=RECONNECT_DEADLINE, what="n2 keeps its mesh IP")


def test_roam_into_a_shared_nat(lab):
    after = lab.roam("n2", "home")
    assert after.router == "r3"
    assert _pings(lab, "n2", lab.node("n4").underlay_ip), "n2 is now on n4's private LAN"
    assert [n.name for n in lab.state().behind("r3")] == ["n2", "n4", "n5"]


def test_roam_of_a_public_node_changes_its_lan_address(lab):
    before = lab.node("n1")
    after = lab.roam("n1")
    plan = lab.plan()
    assert after.router is None and after.underlay_ip != before.underlay_ip and after.underlay_ip in plan.lan_pool
    assert _addresses(lab, "n1") == [f"{after.underlay_ip}/24"]
    assert _default_route(lab, "n1").startswith(f"default via {plan.control_ip} ")
    wait_for(lambda: _broker_peers(lab)[after.underlay_ip] >= 1, timeout=RECONNECT_DEADLINE,
             what="n1's agent reaches the broker from its new address")


def test_after_the_roams_every_pair_reaches_each_other_again(lab):
    # n1 moved to a new LAN address, n2 sits behind the shared NAT with n4 and n5: the peers learn the new
    # endpoints from the candidates and the handshakes, and nobody restarts anything.
    matrix = lab.reachability(NODES, timeout_s=RECONNECT_DEADLINE)
    print(f"reachability after the roams: {matrix.as_dict()}")
    assert matrix.ok(), f"not within {RECONNECT_DEADLINE:.0f} s: {matrix.failures()}"


def test_partition_and_heal_of_a_natted_node_restore_its_default_route(lab):
    lab.partition("n3")
    assert _default_route(lab, "n3") == ""  # a link going down takes its routes with it
    lab.heal("n3")
    assert _default_route(lab, "n3").startswith(f"default via {lab.state().routers['r2'].gateway} ")
    assert _pings(lab, "n3", lab.plan().control_ip)


def test_down_removes_routers_and_their_tables_and_is_repeatable(lab):
    st = lab.state()
    routers = st.ordered_routers()
    assert len(routers) == 4  # r1-r3 from up, r4 from the first roam
    removed = lab.down()
    for router in routers:
        assert f"namespace {router.namespace}" in removed
        assert f"nft table ip {router.nft_table} in {router.namespace}" in removed
    assert leftovers(st.lab_id, lab.store.root) == Leftovers()
    assert lab.down() == []


def test_down_after_a_crash_finds_routers_by_name():
    reason = _missing()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    lab = _new_lab("mlnd-")
    lab_id = new_lab_id()
    try:
        lab.up(1, lab_id=lab_id, nat=["n1"])
        assert f"ml{lab_id}-r1" in system.list_namespaces()
        lab.store.state_file.unlink()  # meshlab died and took its state with it
        lab.down()
        assert leftovers(lab_id, lab.store.root) == Leftovers()
        assert lab.down() == []
    finally:
        lab.down(lab_id=lab_id)
        shutil.rmtree(lab.store.root, ignore_errors=True)
