"""Tables for people: `meshlab status` and the ping matrix. No I/O here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One line of `meshlab status`. `handshakes` maps peer name (or IP) to seconds since its last handshake."""

    name: str
    agent: str  # running | stopped | frozen
    mesh_ip: str | None = None
    node_id: str | None = None
    underlay_ip: str = ""
    partitioned: bool = False
    router: str | None = None  # the NAT router the node sits behind; None: public on the lab's LAN
    router_ip: str | None = None  # that router's address on the LAN: where the control plane sees it from
    peers_configured: int | None = None
    peers_known: int | None = None
    handshakes: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "agent": self.agent, "mesh_ip": self.mesh_ip, "node_id": self.node_id,
            "underlay_ip": self.underlay_ip, "partitioned": self.partitioned,
            "router": self.router, "router_ip": self.router_ip,
            "peers_configured": self.peers_configured, "peers_known": self.peers_known,
            "handshakes_age_s": {peer: None if age is None else round(age, 1)
                                 for peer, age in self.handshakes.items()},
            "error": self.error,
        }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s" if seconds < 600 else f"{seconds / 60:.0f}m"


@dataclass(frozen=True, slots=True)
class RouterRow:
    """One NAT router of `meshlab status`: its LAN address, the private subnet it masquerades, who is behind it."""

    name: str
    lan_ip: str
    private_subnet: str
    group: str | None = None
    nodes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "lan_ip": self.lan_ip, "private_subnet": self.private_subnet,
                "group": self.group, "nodes": list(self.nodes)}


def format_status(rows: Sequence[NodeRow], *, services: Mapping[str, str], routers: Sequence[RouterRow] = ()) -> str:
    """The status table: services first (registrar/broker and their state), one line per node, then routers."""
    lines = ["  ".join(f"{name}={state}" for name, state in services.items())]
    lines.append(f"{'node':<6}{'agent':<9}{'mesh ip':<16}{'underlay':<16}{'nat':<6}{'peers':<7}handshakes (age)")
    for row in rows:
        peers = "-" if row.peers_configured is None else f"{row.peers_configured}/{row.peers_known}"
        shakes = " ".join(f"{peer}:{_age(age)}" for peer, age in sorted(row.handshakes.items()))
        agent = row.agent + ("*" if row.partitioned else "")
        tail = shakes or (row.error or "")
        lines.append(f"{row.name:<6}{agent:<9}{row.mesh_ip or '-':<16}{row.underlay_ip:<16}{row.router or '-':<6}"
                     f"{peers:<7}{tail}")
    if any(row.partitioned for row in rows):
        lines.append("* partitioned: underlay link down")
    for router in routers:
        group = f" (group {router.group})" if router.group else ""
        behind = " ".join(router.nodes) or "nobody"
        lines.append(f"router {router.name}{group}: {router.private_subnet} masqueraded to {router.lan_ip}; "
                     f"behind it: {behind}")
    return "\n".join(lines)


def format_matrix(names: Sequence[str], results: Mapping[tuple[str, str], bool | None]) -> str:
    """A from/to matrix: ok, FAIL, or - for the diagonal and pairs not tried."""
    width = max([4, *(len(n) + 2 for n in names)])
    lines = [" " * width + "".join(f"{n:>{width}}" for n in names)]
    for src in names:
        cells = []
        for dst in names:
            value = results.get((src, dst))
            cells.append(f"{'-' if value is None else ('ok' if value else 'FAIL'):>{width}}")
        lines.append(f"{src:<{width}}" + "".join(cells))
    return "\n".join(lines)
