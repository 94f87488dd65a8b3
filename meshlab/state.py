"""The lab's state file: which namespaces, processes, names and ports a lab made. No I/O here.

One JSON document in the lab directory (see store.py for reading and writing it under a lock) lets a second
shell drive a running lab and lets `down` clean up after the process that ran `up` has died.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BrokerKind = Literal["embedded", "mosquitto"]
STATE_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProcessRecord(_Model):
    """A detached process the lab started: its pid, the pid's start time (to detect pid reuse), its command."""

    pid: int
    start_ticks: int  # field 22 of /proc/<pid>/stat when it was started
    argv: list[str]
    log: str


class UnderlayRule(_Model):
    """One fault on a node's underlay, made with nftables in the node's namespace (meshlab.netfilter renders it).

    Traffic to or from an address in `block` is dropped unless the address is in `allow`; with `loss_percent`,
    that share of every packet on the link is dropped at random (each way).
    """

    block: list[str] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)
    loss_percent: int = Field(default=0, ge=0, le=100)


class NodeRecord(_Model):
    """One node of the lab. `agent` is None while the node is stopped; `mesh_ip` is the last one observed.

    `underlay_ip` is the node's own address: on the lab's LAN for a public node, on its router's private LAN
    for a node behind NAT (`router` names the router). `gateway` is its default route (None in labs made before
    nodes had one).
    `underlay` holds the nftables faults in force on the node, by fault (meshlab.faults): each can be undone
    alone, and all of them vanish with the node's namespace on `down`.
    """

    index: int
    name: str
    namespace: str
    interface: str
    underlay_ip: str
    agent: ProcessRecord | None = None
    node_id: str | None = None
    mesh_ip: str | None = None
    partitioned: bool = False
    router: str | None = None
    gateway: str | None = None

    underlay: dict[str, UnderlayRule] = Field(default_factory=dict)

class RouterRecord(_Model):
    """A NAT router namespace between nodes and the lab's LAN: masquerade out of `lan_ip`, forwarding only there.

    `group` is the --nat-group name of a shared router (None for a node's own router). `nft_table` is the
    nftables table in its namespace (family ip), deleted by `down` before the namespace goes.
    """

    index: int
    name: str
    namespace: str
    lan_ip: str
    private_subnet: str
    gateway: str
    nft_table: str
    group: str | None = None


class ControlRecord(_Model):
    """The control namespace: the registrar (which hosts the embedded broker) and, for Mosquitto, the broker."""

    namespace: str
    registrar: ProcessRecord | None = None
    broker: ProcessRecord | None = None


class LabState(_Model):
    """Everything `meshlab` needs to find and drive a lab from any shell."""

    version: Literal[1] = STATE_VERSION
    lab_id: str
    created_at: float
    broker: BrokerKind = "embedded"
    mesh: str = "lab"
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 3.0
    expiry_s: float | None = None  # the registrar's expiry_s (--expiry); None: its own default
    join_token: str | None = None
    control: ControlRecord
    nodes: dict[str, NodeRecord] = Field(default_factory=dict)
    used_indices: list[int] = Field(default_factory=list)
    routers: dict[str, RouterRecord] = Field(default_factory=dict)
    used_router_indices: list[int] = Field(default_factory=list)

    def node(self, name: str) -> NodeRecord:
        """The record of node `name`; KeyError if the lab has none."""
        return self.nodes[name]

    def ordered_nodes(self) -> list[NodeRecord]:
        """Nodes in index order (n1, n2, ... rather than n1, n10, n2)."""
        return sorted(self.nodes.values(), key=lambda n: n.index)

    def ordered_routers(self) -> list[RouterRecord]:
        """Routers in index order."""
        return sorted(self.routers.values(), key=lambda r: r.index)

    def behind(self, router: str) -> list[NodeRecord]:
        """The nodes behind router `router`, in index order."""
        return [n for n in self.ordered_nodes() if n.router == router]


def dump(state: LabState) -> str:
    """The state file's text."""
    return state.model_dump_json(indent=2) + "\n"


def load(text: str) -> LabState:
    """Parse a state file's text (pydantic ValidationError / ValueError on a bad file)."""
    return LabState.model_validate_json(text)
