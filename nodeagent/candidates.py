"""Which endpoints this node advertises: its configured public endpoint, its reflexive address, its local addresses.

No I/O here: nodeagent.underlay reads the interface addresses and asks the registrar for the reflection, then
calls these rules with what it found and `now`.

  - public: `endpoint` from the settings (an address, a port forward or a DNS name), as configured;
  - reflexive: the address the registrar saw our request come from, with our WireGuard listen port. Behind a NAT
    that maps the listen port to itself (Linux masquerade does while the port is free) peers reach us there.
    Not advertised when it is one of our own addresses (no NAT in between) or cannot be reached from elsewhere
    (loopback, link-local: the registrar runs on this machine or next to it);
  - local: usable addresses of our up interfaces except the mesh interface, the default route's first, IPv4
    before IPv6, at most MAX_LOCAL.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from meshcontract.messages import Endpoint, EndpointKind

# The contract allows 8 endpoints per member; every local address costs peers one trial period when they
# cycle through candidates (nodeagent.endpoints), so a machine with many bridges advertises its first few only.
MAX_ADVERTISED = 8
MAX_LOCAL = 4
# How often the reflexive address is checked again without any other reason (before every registration and
# when a local address changes it is checked at once).
REFLECT_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    """One address on one of this machine's interfaces, as read from the kernel."""

    ifname: str
    address: str
    up: bool = True


def usable_local(address: str) -> bool:
    """True for an address a peer could reach us on: IPv4 other than loopback, link-local, multicast or
    unspecified (private addresses are fine: the LAN path); IPv6 only if globally routable."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.is_global and ip.ipv4_mapped is None
    return not ip.is_reserved


def local_addresses(
    found: Iterable[InterfaceAddress], *, exclude: Collection[str], primary: str | None = None
) -> list[str]:
    """Usable addresses of up interfaces not in `exclude` (the mesh interface), without duplicates: `primary`
    (the default route's source address) first if it is among them, then IPv4 before IPv6, in the order found."""
    seen: dict[str, int] = {}
    for entry in found:
        if not entry.up or entry.ifname in exclude or not usable_local(entry.address):
            continue
        text = str(ipaddress.ip_address(entry.address.split("%", 1)[0]))
        seen.setdefault(text, 4 if ":" in text else 0)
    if primary is not None and primary in seen:
        seen[primary] = -1
    return sorted(seen, key=lambda a: seen[a])  # stable: the kernel's order within each rank


def usable_reflection(reflected: str | None, *, local: Collection[str]) -> str | None:
    """`reflected` if it is worth advertising as a reflexive candidate, else None (see the module docstring)."""
    if reflected is None:
        return None
    try:
        ip = ipaddress.ip_address(reflected)
    except ValueError:
        return None
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast or str(ip) in local:
        return None
    return str(ip)


def advertised(
    *, public: Endpoint | None, local: Sequence[str], reflected: str | None, port: int, max_local: int = MAX_LOCAL
) -> list[Endpoint]:
    """The candidates to register: public, reflexive, then up to `max_local` local addresses with `port`.

    `local` is every usable local address (as from `local_addresses`): a reflection equal to any of them is no
    NAT's address. Duplicates (same host and port) are dropped, the first kind listed wins.
    """
    candidates: list[Endpoint] = []
    if public is not None:
        candidates.append(public.model_copy(update={"kind": EndpointKind.PUBLIC}))
    reflexive = usable_reflection(reflected, local=local)
    if reflexive is not None:
        candidates.append(Endpoint(host=reflexive, port=port, kind=EndpointKind.REFLEXIVE))
    candidates += [Endpoint(host=host, port=port, kind=EndpointKind.LOCAL) for host in local[:max_local]]
    unique: dict[tuple[str, int], Endpoint] = {}
    for endpoint in candidates:
        unique.setdefault((endpoint.host.lower(), endpoint.port), endpoint)
    return list(unique.values())[:MAX_ADVERTISED]


def reflect_due(
    *, last_at: float | None, now: float, local_changed: bool, failed: bool = False, every_s: float = REFLECT_EVERY_S
) -> bool:
    """Whether to ask the registrar for our reflexive address now: never asked, the last attempt failed, a local
    address changed (a new network: likely a new NAT too), or `every_s` passed since the last answer."""
    return last_at is None or failed or local_changed or now - last_at >= every_s
