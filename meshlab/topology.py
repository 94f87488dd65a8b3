"""Where each node sits on the lab's underlay: public on the LAN, or behind a NAT router. No I/O here.

The lab's LAN (the bridge in the control namespace) plays the internet: the control plane and public nodes
have addresses on it. A NAT router is a namespace with one leg on the LAN (its public address, from the
lab's pool) and a private LAN behind it (192.168.<k>.0/24, a bridge, so several nodes can share one router).
It masquerades everything leaving its LAN leg and forwards only what its private side started, like a home
router or a carrier NAT: Linux conntrack keeps a node's source port when it can and lets in only replies.

This module decides: the placements `meshlab up --nat/--nat-group` ask for, where `meshlab roam` moves a
node, which pool address is free, and the router's nftables ruleset (as text).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from meshlab.errors import LabError
from meshlab.plan import ROUTER_LAN_BRIDGE, ROUTER_WAN_IF, LabPlan, node_index
from meshlab.state import LabState, NodeRecord

NFT_FAMILY = "ip"
NFT_TABLE = "meshlab_nat"
GROUP_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")
PUBLIC = "public"
NEW_NAT = "nat"

PlacementKind = Literal["public", "nat", "group", "router"]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a node's underlay link goes.

    public: on the lab's LAN; nat: behind a new router of its own; group: behind the router of --nat-group
    `target` (made by its first member); router: behind the existing router named `target`.
    """

    kind: PlacementKind = "public"
    target: str | None = None

    def describe(self) -> str:
        return {"public": "public", "nat": "behind a NAT of its own"}.get(self.kind, f"behind {self.target}")


PUBLIC_PLACEMENT = Placement()


# --- meshlab up --nat / --nat-group ----------------------------------------------------------------------------


def parse_node_list(text: str) -> list[str]:
    """"n2,n3" -> ["n2", "n3"]; LabError for anything that is not a list of lab node names."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise LabError(f"no node names in {text!r} (expected e.g. n2,n3)")
    for name in names:
        node_index(name)
    return names


def parse_group(text: str) -> tuple[str, list[str]]:
    """"home:n4,n5" -> ("home", ["n4", "n5"]): one --nat-group, a router shared by the listed nodes."""
    name, sep, members = text.partition(":")
    name = name.strip()
    if not sep:
        raise LabError(f"--nat-group {text!r}: expected NAME:NODE[,NODE...], e.g. home:n4,n5")
    check_group_name(name)
    return name, parse_node_list(members)


def check_group_name(name: str) -> str:
    """A group name: [a-z][a-z0-9_-]{0,15}, and not one `roam --to` gives a meaning of its own."""
    if not GROUP_RE.match(name) or name in (PUBLIC, NEW_NAT) or re.fullmatch(r"[rn][0-9]+", name):
        raise LabError(f"invalid NAT group name {name!r}: [a-z][a-z0-9_-]{{0,15}}, not public, nat, r<k> or n<i>")
    return name


def layout(nodes: int, *, nat: Iterable[str] = (), groups: Sequence[tuple[str, Sequence[str]]] = ()) -> list[Placement]:
    """The placement of n1..n`nodes`: each of `nat` behind its own router, each group's members behind one router,
    the rest public. LabError for a node outside the lab, a node placed twice or a group named twice."""
    placements = [PUBLIC_PLACEMENT] * nodes
    placed: dict[str, str] = {}

    def place(name: str, where: Placement, why: str) -> None:
        index = node_index(name)
        if index > nodes:
            raise LabError(f"{why} names {name}, but the lab has n1..n{nodes}")
        if name in placed:
            raise LabError(f"{name} is placed twice ({placed[name]} and {why})")
        placed[name] = why
        placements[index - 1] = where

    for name in nat:
        place(name, Placement("nat"), "--nat")
    seen: set[str] = set()
    for group, members in groups:
        check_group_name(group)
        if group in seen:
            raise LabError(f"NAT group {group} given twice")
        seen.add(group)
        for name in members:
            place(name, Placement("group", group), f"--nat-group {group}")
    return placements


# --- meshlab add / roam ----------------------------------------------------------------------------------------


def find_router(st: LabState, name: str) -> str | None:
    """The name of the router called `name`, or of the router of NAT group `name`; None if there is none."""
    if name in st.routers:
        return name
    for router in st.ordered_routers():
        if router.group == name:
            return router.name
    return None


def parse_target(st: LabState, text: str) -> Placement:
    """`--to` of roam / `--behind` of add: public, nat (a new router), or a router by name or NAT group."""
    if text == PUBLIC:
        return PUBLIC_PLACEMENT
    if text == NEW_NAT:
        return Placement("nat")
    router = find_router(st, text)
    if router is None:
        known = ", ".join(r.name + (f" ({r.group})" if r.group else "") for r in st.ordered_routers()) or "none"
        raise LabError(f"no router or NAT group {text!r} (routers: {known}; or public, nat)")
    return Placement("router", router)


def roam_target(node: NodeRecord, to: Placement | None) -> Placement:
    """Where `meshlab roam` takes `node`: by default a public node gets a new LAN address, and a node behind NAT
    moves behind a new router of its own (Wi-Fi at home -> a mobile carrier's NAT). LabError for a no-op move."""
    if to is None:
        return PUBLIC_PLACEMENT if node.router is None else Placement("nat")
    if to.kind in ("router", "group") and to.target == node.router:
        raise LabError(f"{node.name} is already behind {node.router}")
    return to


def free_lan_ip(plan: LabPlan, st: LabState) -> str:
    """The lowest pool address of the LAN no router and no node holds; LabError when the pool is used up."""
    taken = {r.lan_ip for r in st.routers.values()} | {n.underlay_ip for n in st.nodes.values()}
    for address in plan.lan_pool:
        if address not in taken:
            return address
    raise LabError(f"every LAN pool address of the lab ({len(plan.lan_pool)}) is taken by routers and roamed nodes")


# --- the router --------------------------------------------------------------------------------------------------


def nat_ruleset(*, table: str = NFT_TABLE, wan_if: str = ROUTER_WAN_IF, lan_if: str = ROUTER_LAN_BRIDGE) -> str:
    """The `nft -f` script of a NAT router's namespace (replaces its table: safe to apply twice).

    Everything leaving by the LAN leg is masqueraded, whatever its source: a node that roamed away and still
    sends from its old address is translated too (the control plane then answers with a reset instead of
    leaving the connection hanging), as on a consumer router. Forwarding: out from the private side, and in only
    what conntrack knows as a reply; `lan_if` also matches bridged traffic between two nodes of one private LAN
    where br_netfilter makes it pass the forward hook. The counters are how tests see that translation happened.

    Unsolicited UDP from the LAN leg to the router itself is dropped, as a home router's firewall does. That is
    what lets two nodes behind different routers reach each other: accepted (and answered with a port
    unreachable), a peer's first packet would leave a conntrack entry for the router's port 51820 with the peer,
    so the node's own packets to that peer would be masqueraded from another port, and neither side's packets
    would ever match the other's mapping. Dropped before conntrack confirms it, the packet leaves no entry.
    """
    return "\n".join([
        f"add table {NFT_FAMILY} {table}",
        f"delete table {NFT_FAMILY} {table}",
        f"table {NFT_FAMILY} {table} {{",
        "    chain postrouting {",
        "        type nat hook postrouting priority 100; policy accept;",
        f'        oifname "{wan_if}" counter masquerade',
        "    }",
        "    chain forward {",
        "        type filter hook forward priority 0; policy drop;",
        "        ct state established,related counter accept",
        f'        iifname "{lan_if}" counter accept',
        "    }",
        "    chain input {",
        "        type filter hook input priority 0; policy accept;",
        f'        iifname "{wan_if}" meta l4proto udp ct state new counter drop',
        "    }",
        "}",
    ]) + "\n"


_MASQ_RE = re.compile(r"counter packets (\d+) bytes \d+ masquerade")


def masqueraded_packets(listing: str) -> int:
    """Packets the masquerade rule translated, from `nft list table` output (0 if the rule is not there)."""
    return sum(int(m.group(1)) for m in _MASQ_RE.finditer(listing))
