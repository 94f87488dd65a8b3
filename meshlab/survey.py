"""Reading everything the invariant checker judges from a running lab, and what a lab left after `down`.

One look (a Snapshot): the registrar's HTTP API (through meshlab.controlplane, so it follows the control plane's
contract), every agent's local API, every node's `wg show IF dump`, and optionally a ping over the mesh between
every pair of healthy nodes. What the lab did to each node (its condition) comes from the state file; since when
comes from the caller (the chaos runner knows), else the look itself. MQTT topics are not read: their contract
is changing, and the registrar's API and the agents' own answers say the same things.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshcontract.localapi import AgentStatus
from meshlab import system
from meshlab.errors import CommandError
from meshlab.lab import Lab
from meshlab.meshview import parse_wg_dump
from meshlab.plan import LabPlan
from meshlab.snapshot import (
    AgentSeen,
    Condition,
    Leftovers,
    MemberSeen,
    NodeSeen,
    PairLoss,
    PeerSeen,
    RegistrarSeen,
    Snapshot,
    WgPeer,
    WgSeen,
    condition_of,
)

LOOK_ATTEMPTS = 4  # looks taken in a row while the registrar keeps changing under them
MEMBER_FIELDS = ("node_id", "name", "mesh_ip", "public_key", "state", "unreachable_since", "updated_at")


def conditions(lab: Lab) -> dict[str, Condition]:
    """What the lab did to each node: its condition (meshlab.snapshot.condition_of).

    An agent counts as stopped only when the lab stopped it (its record is cleared on stop, kill and crash). One
    whose recorded process is gone died on its own: the lab still means it to run, so it stays "up" and the
    checker reports what its absence breaks. A node is frozen when any of its processes is stopped: its
    wireguard-go too, whose UAPI would not answer.
    """
    out = {}
    for n in lab.state().ordered_nodes():
        frozen = system.record_state(n.agent) == "frozen" or system.namespace_frozen(n.namespace)
        meant = "frozen" if frozen else "stopped" if n.agent is None else "running"
        out[n.name] = condition_of(agent=meant, partitioned=n.partitioned, faults=n.underlay.keys())
    return out


def control_up(lab: Lab) -> bool:
    """True if the lab's registrar (and Mosquitto, with that broker) processes run and are not frozen."""
    return all(state == "running" for name, state in lab.services().items() if name in ("registrar", "mosquitto"))


def registrar_seen(lab: Lab, *, attempts: int = 3) -> RegistrarSeen | None:
    """The registrar's revision and members, read so that both belong to one revision; None if it does not answer.

    /v1/mesh is read before and after /v1/nodes: a change in between shows as two revisions, and the look is
    repeated (a few times at most; the last one is returned even if the registrar kept changing).
    """
    seen = None
    for _ in range(attempts):
        before, nodes, after = lab.control.registrar_api(["/v1/mesh", "/v1/nodes", "/v1/mesh"])
        if not isinstance(before, dict) or not isinstance(nodes, list) or not isinstance(after, dict):
            return None
        members = tuple(MemberSeen(**{k: m.get(k) for k in MEMBER_FIELDS}) for m in nodes)
        seen = RegistrarSeen(revision=after["revision"], broker_connected=bool(after.get("broker_connected")),
                             members=members)
        if before["revision"] == after["revision"]:
            return seen
    return seen


def agent_seen(status: AgentStatus) -> AgentSeen:
    """The part of an agent's status the checker judges."""
    return AgentSeen(
        node_id=status.node_id, mesh_ip=status.mesh_ip, ready=status.ready, broker_connected=status.broker_connected,
        membership_revision=status.membership_revision, membership_complete=status.membership_complete,
        peers=tuple(PeerSeen(p.node_id, p.name, p.mesh_ip, p.public_key, p.state, p.configured) for p in status.peers),
    )


def wg_seen(lab: Lab, name: str) -> WgSeen | None:
    """The node's interface as wireguard-go holds it (`wg show IF dump` in its namespace); None if none."""
    record = lab.node(name)
    try:
        proc = system.run(system.ns_argv(record.namespace, ["wg", "show", record.interface, "dump"]), check=False,
                          timeout=5)
    except CommandError:  # timed out: wireguard-go is not answering (stopped); nothing to read
        return None
    parsed = parse_wg_dump(proc.stdout) if proc.returncode == 0 else None
    if parsed is None:
        return None
    own, peers = parsed
    return WgSeen(own, tuple(WgPeer(key, allowed, shake) for key, allowed, shake in peers))


def reach(lab: Lab, ips: Mapping[str, str], *, wait_s: float = 2.0) -> tuple[tuple[str, str, bool], ...]:
    """One ping over the mesh for every pair of nodes in `ips` (name -> mesh IP), all at once; (src, dst,
    answered) per pair."""
    st = lab.state()
    names = list(ips)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    procs = [(a, b, subprocess.Popen(system.ns_argv(st.nodes[a].namespace,
                                                    ["ping", "-n", "-q", "-c", "1", "-W", str(wait_s), ips[b]]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) for a, b in pairs]
    return tuple((a, b, proc.wait(timeout=wait_s + 10) == 0) for a, b, proc in procs)


def look(lab: Lab, *, since: Mapping[str, float] | None = None, control_since: float | None = None,
         traffic: Sequence[PairLoss] = (), probe: bool = False) -> Snapshot:
    """One look at the lab. `since` (per node) and `control_since` default to now: a look without history gives
    every healthy thing the whole of its bound from now. `probe` adds a ping between every pair of healthy nodes.
    """
    for _ in range(LOOK_ATTEMPTS):
        snap = _look_once(lab, since=since, control_since=control_since, traffic=traffic, probe=probe)
        if snap.registrar_steady:
            break
    return snap


def _look_once(lab: Lab, *, since: Mapping[str, float] | None, control_since: float | None,
               traffic: Sequence[PairLoss], probe: bool) -> Snapshot:
    now = time.time()
    conds = conditions(lab)
    up = control_up(lab)
    running = lab.services().get("registrar") == "running"
    # The registrar's revision is read before the nodes and its members after them: a change in between shows
    # as a moved revision, and such a look is taken again (a registrar change stamped after the nodes were read
    # can never make what they held look late).
    before = lab.control.registrar_api(["/v1/mesh"])[0] if running else None
    nodes = []
    for record in lab.state().ordered_nodes():
        cond = conds[record.name]
        # A frozen agent or wireguard-go would only make us wait for a timeout: nothing to read there.
        readable = cond != "frozen"
        status = lab.agent_status(record.name, timeout=1.0) if readable and cond != "down" else None
        nodes.append(NodeSeen(
            name=record.name, node_id=record.node_id, condition=cond,
            since=(since or {}).get(record.name, now),
            agent=agent_seen(status) if status else None,
            wg=wg_seen(lab, record.name) if readable else None,
        ))
    # Mesh IPs as the agents report them: a node that joined during a chaos run is in no state file yet.
    healthy = {n.name: n.agent.mesh_ip for n in nodes if n.condition == "up" and n.agent and n.agent.mesh_ip}
    registrar = registrar_seen(lab) if running else None
    steady = registrar is None or (isinstance(before, dict) and before.get("revision") == registrar.revision)
    return Snapshot(
        now=now, control_since=(control_since if control_since is not None else now) if up else None,
        registrar=registrar, nodes=tuple(nodes), traffic=tuple(traffic),
        reach=reach(lab, healthy) if probe and up else (), registrar_steady=steady,
    )


def leftovers(lab_id: str, lab_dir: Path) -> Leftovers:
    """What remains of lab `lab_id` after `down`: its namespaces, wireguard-go sockets, host interfaces named
    like its own, and processes started from its directory or running its interfaces."""
    plan = LabPlan(lab_id)
    namespaces = tuple(ns for ns in system.list_namespaces() if plan.owns_namespace(ns))
    sockets = tuple(sorted(p.name for p in system.WG_SOCKET_DIR.glob(f"{plan.wg_prefix}*.sock"))
                    if system.WG_SOCKET_DIR.is_dir() else ())
    out = system.run(["ip", "-o", "link", "show"], check=False).stdout
    links = tuple(sorted(
        name for name in (line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line)
        if name.startswith(plan.wg_prefix) or name == plan.bridge))
    marks = (str(Path(lab_dir).resolve()), plan.wg_prefix)
    ours = _ancestry()
    procs = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(mark in cmdline for mark in marks) and int(proc_dir.name) not in ours:
            procs.append(f"{proc_dir.name} {cmdline[:160]}")
    return Leftovers(namespaces=namespaces, wg_sockets=sockets, links=links, processes=tuple(procs))


def _ancestry() -> set[int]:
    """This process and its ancestors: `meshlab --lab-dir DIR chaos` names the lab dir and is no leak."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids
