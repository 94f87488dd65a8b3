"""Observing a running lab: each agent's own status, the WireGuard peers each node really holds, and the mesh.

Reads only: the state file, the process table, the agents' local API sockets and `wg show` inside each node's
namespace. Judging what was read is meshlab.meshview's job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from meshcontract.errors import ContractError
from meshcontract.localapi import AgentStatus, LocalRequest, query
from meshlab import system
from meshlab.context import LabContext
from meshlab.errors import NotReadyError
from meshlab.meshview import NodeTunnels, mesh_problems, parse_wg_allowed_ips
from meshlab.report import NodeRow, RouterRow
from meshlab.waiting import wait_for


class Observer:
    """What the lab's nodes report about themselves and hold in their WireGuard interfaces, right now."""

    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    def agent_status(self, name: str, *, timeout: float = 2.0) -> AgentStatus | None:
        """The agent's own status over its local socket; None if it does not answer (stopped, frozen)."""
        sock = self.ctx.store.agent_socket(name)
        if not sock.exists():
            return None
        try:
            response = query(LocalRequest(op="status"), socket_path=str(sock), timeout=timeout)
        except ContractError:
            return None
        return response.status if response.ok else None

    def wg_peers(self, name: str) -> tuple[tuple[str, ...], ...] | None:
        """The node's WireGuard peers as wireguard-go really holds them (allowed IPs); None if no interface."""
        record = self.ctx.node(name)
        proc = system.run(system.ns_argv(record.namespace, ["wg", "show", record.interface, "allowed-ips"]),
                          check=False, timeout=5)
        if proc.returncode != 0:
            return None
        return parse_wg_allowed_ips(proc.stdout)

    def views(self, names: Sequence[str] | None = None) -> dict[str, NodeTunnels]:
        """What each node (default: all) holds right now: its mesh IP (from the state file) and WireGuard peers."""
        st = self.ctx.state()
        return {record.name: NodeTunnels(record.name, record.mesh_ip, self.wg_peers(record.name) or ())
                for record in st.ordered_nodes() if names is None or record.name in names}

    def running_nodes(self) -> list[str]:
        """Nodes whose agent runs (not stopped, not frozen) and whose underlay is not cut."""
        st = self.ctx.state()
        return [n.name for n in st.ordered_nodes()
                if system.record_state(n.agent) == "running" and not n.partitioned]

    def mesh_problems(self, expected: Sequence[str] | None = None) -> list[str]:
        """Why the mesh of `expected` nodes (default: running ones) is not complete; [] when it is. Tunnels to a
        node whose agent is down but whose WireGuard answers (killed, or stopped) are allowed, not required."""
        names = list(expected) if expected is not None else self.running_nodes()
        st = self.ctx.state()
        resting = [n.name for n in st.ordered_nodes() if n.name not in names and not n.partitioned
                   and system.record_state(n.agent) == "stopped"]  # fmt: skip
        alive = [n for n in resting if self.wg_peers(n) is not None]  # its wireguard-go still runs
        return mesh_problems(self.views(names + alive), names, tolerated=alive)

    def wait_mesh(self, expected: Sequence[str] | None = None, *, timeout: float = 30.0) -> float:
        """Wait until the mesh of `expected` nodes is complete; seconds taken, NotReadyError with the reasons."""
        last: list[str] = []

        def complete() -> bool:
            nonlocal last
            last = self.mesh_problems(expected)
            return not last

        try:
            return wait_for(complete, timeout=timeout, what="mesh complete", interval=0.25)
        except NotReadyError as exc:
            raise NotReadyError(f"{exc}: {'; '.join(last)}") from None

    def rows(self) -> list[NodeRow]:
        """One status row per node, from the state file, the process table and the agent's local API."""
        st = self.ctx.state()
        rows = []
        names_by_ip = {n.mesh_ip: n.name for n in st.nodes.values() if n.mesh_ip}
        for record in st.ordered_nodes():
            agent = system.record_state(record.agent)
            router = st.routers.get(record.router) if record.router else None
            row = NodeRow(name=record.name, agent=agent, mesh_ip=record.mesh_ip, node_id=record.node_id,
                          underlay_ip=record.underlay_ip, partitioned=record.partitioned, router=record.router,
                          router_ip=router.lan_ip if router else None)
            status = self.agent_status(record.name, timeout=1.0) if agent == "running" else None
            if status is not None:
                row = dataclasses.replace(
                    row, mesh_ip=status.mesh_ip, node_id=status.node_id,
                    peers_configured=sum(1 for p in status.peers if p.configured), peers_known=len(status.peers),
                    handshakes={
                        names_by_ip.get(p.mesh_ip, p.name): (None if p.latest_handshake is None
                                                             else max(0.0, status.now - p.latest_handshake))
                        for p in status.peers if p.configured
                    },
                )
            elif agent == "running":
                row = dataclasses.replace(row, error="agent not answering on its socket")
            rows.append(row)
        return rows

    def router_rows(self) -> list[RouterRow]:
        """One status row per NAT router, with the nodes behind it."""
        st = self.ctx.state()
        return [RouterRow(name=r.name, lan_ip=r.lan_ip, private_subnet=r.private_subnet, group=r.group,
                          nodes=tuple(n.name for n in st.behind(r.name))) for r in st.ordered_routers()]
