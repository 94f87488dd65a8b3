"""A node's place on the lab's underlay: its link into the LAN or behind a NAT router, the routers, and roaming.

meshlab.topology decides where a node goes; this module makes it so with ip and nft inside the lab's
namespaces. A node always has one link, `ul0`, and a default route: via the control plane's address for a
public node (the LAN plays the internet), via its router for a node behind NAT. The agent is started without
--endpoint, so it derives its address from that route as it would on a laptop.

Every router is written to the state file before its namespace exists, so `down` finds it whatever happens.
Callers hold the lab lock and save the state they pass in.
"""

from __future__ import annotations

from meshlab import system
from meshlab.context import LabContext
from meshlab.errors import LabError
from meshlab.plan import ROUTER_LAN_BRIDGE, ROUTER_WAN_IF, UNDERLAY_IF, UNDERLAY_PREFIX, LabPlan, next_index
from meshlab.state import LabState, NodeRecord, RouterRecord
from meshlab.topology import (
    NFT_FAMILY,
    NFT_TABLE,
    Placement,
    find_router,
    free_lan_ip,
    masqueraded_packets,
    nat_ruleset,
)


class Underlay:
    """Plugs nodes into the underlay, builds NAT routers, and moves nodes between networks."""

    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    def attach(self, st: LabState, record: NodeRecord, placement: Placement) -> None:
        """Give a new node (its namespace exists) its link where `placement` says; `record` says where it went."""
        self._plug(st, record, placement, new_address=False)

    def move(self, st: LabState, record: NodeRecord, placement: Placement) -> None:
        """Roam: the node's old address goes and a new one comes, on the same network or behind another router.

        Processes in the node keep running. Sockets bound to the old address are left with an address the node
        no longer has, as on a laptop that switched networks; wireguard-go's socket is bound to the wildcard
        address and sends from the new one at once.
        """
        old = (record.router, record.underlay_ip)
        if placement.kind == "public" and record.router is None:
            plan = self.ctx.plan(st)
            record.underlay_ip = free_lan_ip(plan, st)
            self.ctx.store.save(st)
            system.readdress(record.namespace, UNDERLAY_IF, f"{record.underlay_ip}/{UNDERLAY_PREFIX}")
            system.set_default_route(record.namespace, UNDERLAY_IF, plan.control_ip)
        else:
            system.delete_link(record.namespace, UNDERLAY_IF)
            self._plug(st, record, placement, new_address=True)
        record.partitioned = False  # the new link is up, whatever happened to the old one
        self.ctx.report(f"{record.name}: roamed from {_where(*old)} to {_where(record.router, record.underlay_ip)}")

    def restore_route(self, record: NodeRecord) -> None:
        """Put the node's default route back (a link going down takes it away; healing brings only the address)."""
        if record.gateway:
            system.set_default_route(record.namespace, UNDERLAY_IF, record.gateway)

    def _plug(self, st: LabState, record: NodeRecord, placement: Placement, *, new_address: bool) -> None:
        plan = self.ctx.plan(st)
        if placement.kind == "public":
            address = free_lan_ip(plan, st) if new_address else plan.node(record.index).underlay_ip
            record.router, record.underlay_ip, record.gateway = None, address, plan.control_ip
            self.ctx.store.save(st)
            system.add_node_link(node_ns=record.namespace, ifname=UNDERLAY_IF, address=f"{address}/{UNDERLAY_PREFIX}",
                                 bridge_ns=plan.control_ns, bridge=plan.bridge, port=f"ulp{record.index}")
        else:
            router = self._router_for(st, plan, placement)
            router_plan = plan.router(router.index)
            record.router, record.gateway = router.name, router.gateway
            record.underlay_ip = router_plan.node_address(record.index)
            self.ctx.store.save(st)
            system.add_node_link(node_ns=record.namespace, ifname=UNDERLAY_IF,
                                 address=f"{record.underlay_ip}/{UNDERLAY_PREFIX}", bridge_ns=router.namespace,
                                 bridge=ROUTER_LAN_BRIDGE, port=router_plan.node_port(record.index))
        system.set_default_route(record.namespace, UNDERLAY_IF, record.gateway)
        self.ctx.report(f"{record.name}: namespace {record.namespace}, underlay {_where(record.router, record.underlay_ip)}, "
                        f"interface {record.interface}")

    def _router_for(self, st: LabState, plan: LabPlan, placement: Placement) -> RouterRecord:
        if placement.kind == "nat":
            return self._build_router(st, plan, group=None)
        assert placement.target is not None
        name = find_router(st, placement.target)
        if name is not None:
            return st.routers[name]
        if placement.kind == "group":
            return self._build_router(st, plan, group=placement.target)
        raise LabError(f"no router {placement.target!r} in this lab")

    def _build_router(self, st: LabState, plan: LabPlan, *, group: str | None) -> RouterRecord:
        index = next_index(st.used_router_indices)
        router_plan = plan.router(index)
        router = RouterRecord(index=index, name=router_plan.name, namespace=router_plan.namespace,
                              lan_ip=free_lan_ip(plan, st), private_subnet=str(router_plan.private_subnet),
                              gateway=router_plan.gateway, nft_table=NFT_TABLE, group=group)
        st.used_router_indices.append(index)
        st.routers[router.name] = router
        self.ctx.store.save(st)
        system.add_namespace(router.namespace)
        system.add_node_link(node_ns=router.namespace, ifname=ROUTER_WAN_IF,
                             address=f"{router.lan_ip}/{plan.subnet.prefixlen}", bridge_ns=plan.control_ns,
                             bridge=plan.bridge, port=router_plan.wan_port)
        system.set_default_route(router.namespace, ROUTER_WAN_IF, plan.control_ip)
        system.add_bridge(router.namespace, ROUTER_LAN_BRIDGE, f"{router.gateway}/{UNDERLAY_PREFIX}")
        # Rules before forwarding: not one packet leaves the private side untranslated.
        system.nft_apply(router.namespace, nat_ruleset(table=router.nft_table))
        system.enable_forwarding(router.namespace)
        self.ctx.report(f"router {router.name}" + (f" (NAT group {group})" if group else "")
                        + f": namespace {router.namespace}, {router.private_subnet} masqueraded to {router.lan_ip}")
        return router

    def masqueraded(self, router: str) -> int:
        """Packets router `router`'s masquerade rule has translated so far (new connections, not every packet)."""
        record = self.ctx.state().routers[router]
        return masqueraded_packets(system.nft_list_table(record.namespace, NFT_FAMILY, record.nft_table))


def remove_router_tables(st: LabState) -> list[str]:
    """Delete the recorded routers' nftables tables (before `down` deletes their namespaces); what went."""
    return [f"nft table {NFT_FAMILY} {r.nft_table} in {r.namespace}" for r in st.ordered_routers()
            if system.nft_delete_table(r.namespace, NFT_FAMILY, r.nft_table)]


def _where(router: str | None, address: str) -> str:
    return address if router is None else f"{address} behind {router}"
