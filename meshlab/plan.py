"""Names and addresses of everything a lab creates. No I/O here.

Every name carries the lab id, so two labs (or two test sessions) on one machine never collide and `down`
can find leftovers by prefix after a crash:

    namespaces      ml<id>-ctl (bridge, broker, registrar), ml<id>-n<i> (one per node)
    bridge          mlbr-<id>, inside the control namespace: the host's root namespace gets no interface
    node veth       ul0 inside the node namespace, its peer ulp<i> on the bridge
    wireguard       mv-<id>-<i>: wireguard-go's UAPI socket (/var/run/wireguard/<if>.sock) is shared by
                    all namespaces, so interface names must be unique on the machine
    underlay        10.77.<octet>.0/24 (the lab's LAN, its "internet"), only inside the lab's namespaces;
                    control .1, node i .(10+i), and .211-.254 a pool for NAT routers' upstream sides and
                    public nodes that roamed (meshlab.topology hands them out)
    NAT router k    ml<id>-r<k>: wan0 on the LAN (peer ulr<k> on the bridge), bridge lan0 192.168.<k>.1/24 for
                    the private LAN behind it; node i behind it: ul0 192.168.<k>.(10+i), peer np<i> on lan0
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from meshlab.errors import LabError

ID_RE = re.compile(r"^[a-z0-9]{2,5}$")
IFNAME_MAX = 15
MAX_NODES = 200  # underlay host numbers 11..210
POOL_HOSTS = range(211, 255)  # LAN addresses handed out by meshlab.topology (routers, roamed public nodes)
MAX_ROUTERS = 254  # private subnets 192.168.1.0/24 .. 192.168.254.0/24
CONTROL = "ctl"
UNDERLAY_IF = "ul0"
UNDERLAY_PREFIX = 24  # the LAN and every private LAN behind a router are /24s
ROUTER_WAN_IF = "wan0"
ROUTER_LAN_BRIDGE = "lan0"
BROKER_PORT = 1883
HTTP_PORT = 8080
# Node n<i> listens on WG_PORT + i - 1. Distinct ports matter behind one NAT router: Linux keeps a node's port
# through the NAT only while no other mapping to the same peer holds it, so two nodes on 51820 behind one router
# would reach nodes behind other NATs only from the first node's port (docs/lab.md, "NAT").
WG_PORT = 51820


def check_lab_id(lab_id: str) -> str:
    """Return `lab_id` if it is 2-5 lowercase letters/digits (it must fit in 15-char interface names)."""
    if not ID_RE.match(lab_id):
        raise LabError(f"invalid lab id {lab_id!r}: 2-5 characters of [a-z0-9]")
    return lab_id


def underlay_octet(lab_id: str) -> int:
    """The third octet of the lab's underlay subnet, derived from its id so logs of different labs differ."""
    return int.from_bytes(hashlib.sha256(lab_id.encode()).digest()[:2], "big") % 254 + 1


@dataclass(frozen=True, slots=True)
class LabPlan:
    """The naming and address plan of one lab, derived from its id alone."""

    lab_id: str

    def __post_init__(self) -> None:
        check_lab_id(self.lab_id)

    @property
    def prefix(self) -> str:
        """Prefix of every namespace this lab creates (used by `down` to find leftovers)."""
        return f"ml{self.lab_id}-"

    @property
    def control_ns(self) -> str:
        return f"{self.prefix}{CONTROL}"

    @property
    def bridge(self) -> str:
        return f"mlbr-{self.lab_id}"

    @property
    def wg_prefix(self) -> str:
        """Prefix of this lab's WireGuard interface names (and their UAPI sockets)."""
        return f"mv-{self.lab_id}-"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.77.{underlay_octet(self.lab_id)}.0/24")

    @property
    def control_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def broker_url(self) -> str:
        return f"mqtts://{self.control_ip}:{BROKER_PORT}"

    @property
    def http_url(self) -> str:
        return f"https://{self.control_ip}:{HTTP_PORT}"

    @property
    def lan_pool(self) -> list[str]:
        """LAN addresses for routers' upstream sides and roamed public nodes, lowest first."""
        return [str(self.subnet.network_address + host) for host in POOL_HOSTS]

    def node(self, index: int) -> NodePlan:
        """The plan of node number `index` (1-based)."""
        if not 1 <= index <= MAX_NODES:
            raise LabError(f"node index {index} outside 1..{MAX_NODES}")
        return NodePlan(
            index=index,
            name=f"n{index}",
            namespace=f"{self.prefix}n{index}",
            underlay_ip=str(self.subnet.network_address + 10 + index),
            underlay_prefix=self.subnet.prefixlen,
            bridge_port=f"ulp{index}",
            interface=f"{self.wg_prefix}{index}",
            listen_port=WG_PORT + index - 1,
        )

    def router(self, index: int) -> RouterPlan:
        """The plan of NAT router number `index` (1-based; never reused within a lab, like node numbers)."""
        if not 1 <= index <= MAX_ROUTERS:
            raise LabError(f"router index {index} outside 1..{MAX_ROUTERS}")
        return RouterPlan(
            index=index,
            name=f"r{index}",
            namespace=f"{self.prefix}r{index}",
            wan_port=f"ulr{index}",
            private_subnet=ipaddress.IPv4Network(f"192.168.{index}.0/{UNDERLAY_PREFIX}"),
        )

    def owns_namespace(self, name: str) -> bool:
        """True if namespace `name` was made by this lab."""
        return name.startswith(self.prefix)


@dataclass(frozen=True, slots=True)
class NodePlan:
    """Names and addresses of one node."""

    index: int
    name: str
    namespace: str
    underlay_ip: str
    underlay_prefix: int
    bridge_port: str
    interface: str
    listen_port: int

    @property
    def endpoint(self) -> str:
        return f"{self.underlay_ip}:{self.listen_port}"


@dataclass(frozen=True, slots=True)
class RouterPlan:
    """Names and private addresses of one NAT router; its LAN (upstream) address comes from the lab's pool."""

    index: int
    name: str
    namespace: str
    wan_port: str  # the bridge port in the control namespace, peer of the router's wan0
    private_subnet: ipaddress.IPv4Network

    @property
    def gateway(self) -> str:
        """The router's address on its private LAN: the default gateway of the nodes behind it."""
        return str(self.private_subnet.network_address + 1)

    def node_address(self, node_index: int) -> str:
        """The private address of node `node_index` behind this router (192.168.<k>.(10+i))."""
        if not 1 <= node_index <= MAX_NODES:
            raise LabError(f"node index {node_index} outside 1..{MAX_NODES}")
        return str(self.private_subnet.network_address + 10 + node_index)

    @staticmethod
    def node_port(node_index: int) -> str:
        """The port of the router's lan0 bridge that node `node_index`'s link plugs into."""
        return f"np{node_index}"


def node_index(name: str) -> int:
    """The index of a node from its lab name ("n3" -> 3); LabError for anything else."""
    match = re.fullmatch(r"n([1-9][0-9]{0,2})", name)
    if not match:
        raise LabError(f"unknown node {name!r}: lab nodes are named n1, n2, ...")
    return int(match.group(1))


def next_index(existing: list[int]) -> int:
    """The index for a new node: one past the highest ever used, so a name is never reused for a new identity."""
    return max(existing, default=0) + 1
