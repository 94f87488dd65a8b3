"""What one look at a lab saw, as plain data the invariant checker judges. No I/O here.

A Snapshot holds what was read (the registrar's HTTP API, each agent's local API, each node's `wg show`, the
continuous pings between stable pairs) next to what the lab knows it did (each node's condition and since
when, since when the control plane is up). Every time is unix time (wall clock), the clock the registrar and
the agents stamp their own records with, all on one host. Snapshots round-trip through JSON so a recorded
state can be checked again, in a unit test or from a chaos run's --json file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

# What the lab did to a node. "silent" conditions leave the control plane without news of the node.
Condition = Literal["up", "down", "frozen", "isolated", "lossy"]
SILENT: frozenset[str] = frozenset({"down", "frozen", "isolated"})


@dataclass(frozen=True, slots=True)
class MemberSeen:
    """One member as the registrar's GET /v1/nodes lists it."""

    node_id: str
    name: str
    mesh_ip: str
    public_key: str
    state: str  # active | unreachable
    unreachable_since: float | None = None
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class RegistrarSeen:
    """The registrar's answer: its revision (GET /v1/mesh), members (GET /v1/nodes), whether it has its broker."""

    revision: int
    broker_connected: bool
    members: tuple[MemberSeen, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerSeen:
    """One member in an agent's own view (its local API's status)."""

    node_id: str
    name: str
    mesh_ip: str
    public_key: str
    state: str
    configured: bool


@dataclass(frozen=True, slots=True)
class AgentSeen:
    """An agent's own status over its local API."""

    node_id: str
    mesh_ip: str | None
    ready: bool
    broker_connected: bool
    membership_revision: int
    membership_complete: bool
    peers: tuple[PeerSeen, ...] = ()


@dataclass(frozen=True, slots=True)
class WgPeer:
    """A peer wireguard-go really holds (`wg show IF dump`): key, allowed IPs without /32, last handshake."""

    public_key: str
    allowed_ips: tuple[str, ...] = ()
    latest_handshake: float | None = None


@dataclass(frozen=True, slots=True)
class WgSeen:
    """A node's WireGuard interface: its own public key and its peers."""

    public_key: str
    peers: tuple[WgPeer, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeSeen:
    """One lab node: what the lab did to it (condition, since when) and what it answered (None: no answer)."""

    name: str
    node_id: str | None
    condition: Condition
    since: float
    agent: AgentSeen | None = None
    wg: WgSeen | None = None


@dataclass(frozen=True, slots=True)
class PairLoss:
    """Probes between a stable pair since the last look: how many were sent, which were never answered."""

    src: str
    dst: str
    sent: int
    lost: tuple[tuple[int, float], ...] = ()  # (icmp_seq, unix time it was sent)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One look at the whole lab at `now`. `control_since` is None while the lab has its control plane down."""

    now: float
    control_since: float | None
    registrar: RegistrarSeen | None
    nodes: tuple[NodeSeen, ...] = ()
    traffic: tuple[PairLoss, ...] = ()
    reach: tuple[tuple[str, str, bool], ...] = ()  # (src, dst, answered) for pairs probed in this look
    # False if the registrar's revision moved while the nodes were read: what the registrar says and what the
    # nodes hold may then belong to different moments, and comparing them proves nothing yet.
    registrar_steady: bool = True

    def node(self, name: str) -> NodeSeen | None:
        return next((n for n in self.nodes if n.name == name), None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Snapshot:
        """The inverse of to_dict (for recorded states)."""
        reg = data.get("registrar")
        registrar = None
        if reg is not None:
            registrar = RegistrarSeen(revision=reg["revision"], broker_connected=reg["broker_connected"],
                                      members=tuple(MemberSeen(**m) for m in reg.get("members", ())))
        nodes = []
        for n in data.get("nodes", ()):
            agent = n.get("agent")
            wg = n.get("wg")
            nodes.append(NodeSeen(
                name=n["name"], node_id=n.get("node_id"), condition=n["condition"], since=n["since"],
                agent=None if agent is None else AgentSeen(**{**agent, "peers": tuple(
                    PeerSeen(**p) for p in agent.get("peers", ()))}),
                wg=None if wg is None else WgSeen(public_key=wg["public_key"], peers=tuple(
                    WgPeer(p["public_key"], tuple(p.get("allowed_ips", ())), p.get("latest_handshake"))
                    for p in wg.get("peers", ()))),
            ))
        traffic = tuple(PairLoss(t["src"], t["dst"], t["sent"], tuple(tuple(x) for x in t.get("lost", ())))
                        for t in data.get("traffic", ()))
        return cls(now=data["now"], control_since=data.get("control_since"), registrar=registrar,
                   nodes=tuple(nodes), traffic=traffic, reach=tuple(tuple(r) for r in data.get("reach", ())),
                   registrar_steady=data.get("registrar_steady", True))


@dataclass(frozen=True, slots=True)
class Leftovers:
    """What is left of a lab after `down`: anything here is a leak."""

    namespaces: tuple[str, ...] = ()
    wg_sockets: tuple[str, ...] = ()
    links: tuple[str, ...] = ()  # interfaces in the host's namespace named like the lab's
    processes: tuple[str, ...] = ()  # "pid cmdline" of processes still running from the lab



def condition_of(*, agent: str, partitioned: bool, faults: Iterable[str]) -> Condition:
    """A node's condition from what the lab holds about it: its agent's process state (running, frozen,
    stopped), its link, and the tags of the underlay faults in force (meshlab.faults)."""
    tags = set(faults)
    if agent == "stopped":
        return "down"
    if agent == "frozen":
        return "frozen"
    if partitioned or tags & {"control", "isolate"}:
        return "isolated"
    if "loss" in tags:
        return "lossy"
    return "up"
