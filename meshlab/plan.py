"""Names and addresses of everything a lab creates. No I/O here.

Every name carries the lab id, so two labs (or two test sessions) on one machine never collide and `down`
can find leftovers by prefix after a crash:

    namespaces      ml<id>-ctl (bridge, broker, registrar), ml<id>-n<i> (one per node)
    bridge          mlbr-<id>, inside the control namespace: the host's root namespace gets no interface
    node veth       ul0 inside the node namespace, its peer ulp<i> on the bridge
    wireguard       mv-<id>-<i>: wireguard-go's UAPI socket (/var/run/wireguard/<if>.sock) is shared by
                    all namespaces, so interface names must be unique on the machine
    underlay        10.77.<octet>.0/24, only inside the lab's namespaces; control .1, node i .(10+i)
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from meshlab.errors import LabError

ID_RE = re.compile(r"^[a-z0-9]{2,5}$")
IFNAME_MAX = 15
MAX_NODES = 240  # underlay host numbers 11..250
CONTROL = "ctl"
UNDERLAY_IF = "ul0"
BROKER_PORT = 1883
HTTP_PORT = 8080
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
            listen_port=WG_PORT,
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


def node_index(name: str) -> int:
    """The index of a node from its lab name ("n3" -> 3); LabError for anything else."""
    match = re.fullmatch(r"n([1-9][0-9]{0,2})", name)
    if not match:
        raise LabError(f"unknown node {name!r}: lab nodes are named n1, n2, ...")
    return int(match.group(1))


def next_index(existing: list[int]) -> int:
    """The index for a new node: one past the highest ever used, so a name is never reused for a new identity."""
    return max(existing, default=0) + 1
