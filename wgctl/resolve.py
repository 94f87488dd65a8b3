"""Turning `host:port` endpoints into the `IP:port` form every backend needs.

The shared contract lets a node advertise a DNS name, but neither wireguard-go's UAPI nor the kernel
resolves names, and a name never compares equal to the address WireGuard reports back, so the plan would
re-upsert the peer forever. Resolve once, when building the desired peer, and hand wgctl the address.
"""

from __future__ import annotations

import ipaddress
import socket

from wgctl.diff import canonical_endpoint
from wgctl.errors import InvalidConfigError, ResolveError


def resolve_endpoint(endpoint: str, *, prefer_ipv4: bool = True) -> str:
    """`endpoint` with its host resolved to an IP literal (`IP:port` / `[IPv6]:port`).

    IP literals are returned canonicalised without a lookup. A name takes the first IPv4 address (or IPv6
    if `prefer_ipv4` is False or there is no IPv4). ResolveError (temporary) if the lookup fails,
    InvalidConfigError if `endpoint` has no valid port.
    """
    host, sep, port_text = endpoint.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidConfigError(f"endpoint {endpoint!r} has no valid port")
    port = int(port_text)
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        return canonical_endpoint(f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}") or endpoint
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolveError(f"cannot resolve endpoint host {bare!r}: {exc}") from exc
    addresses = [info[4][0] for info in infos]
    v4 = [a for a in addresses if ":" not in a]
    v6 = [a for a in addresses if ":" in a]
    ordered = (v4 + v6) if prefer_ipv4 else (v6 + v4)
    if not ordered:
        raise ResolveError(f"endpoint host {bare!r} has no addresses")
    address = ordered[0].split("%", 1)[0]
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
