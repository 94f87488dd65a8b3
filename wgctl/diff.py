"""The pure plan from actual to desired peers. No I/O here.

`plan` compares what a node wants with what its interface has and returns the smallest PeerChanges that
closes the gap: add missing peers, update changed ones (with their full config), remove extra ones, and never
mention a peer that is already right — so re-running it on a converged interface yields an empty plan.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from wgctl.model import PeerChanges, PeerConfig, PeerState


def canonical_cidr(cidr: str) -> str:
    """A CIDR as WireGuard reports it: host bits cleared, IPv6 compressed (10.0.0.5/24 -> 10.0.0.0/24).

    A bare address gets the full prefix (/32 or /128). ValueError if it is not an IP network.
    """
    return str(ipaddress.ip_network(cidr.strip(), strict=False))


def canonical_endpoint(endpoint: str | None) -> str | None:
    """`host:port` with an IP literal normalised (IPv6 in brackets, compressed); hostnames are kept as given.

    WireGuard resolves hostnames once and reports the address, so a desired endpoint should be an IP literal
    for the plan to converge; see docs/wgctl.md.
    """
    if endpoint is None:
        return None
    text = endpoint.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return f"{host.lower()}:{int(port)}"
    if addr.version == 6:
        return f"[{addr}]:{int(port)}"
    return f"{addr}:{int(port)}"


def peer_differs(desired: PeerConfig, actual: PeerConfig) -> bool:
    """True if applying `desired` would change `actual`.

    Allowed IPs compare as sets of canonical CIDRs (order and host bits do not matter). A desired endpoint of
    None means "no opinion": WireGuard cannot unset an endpoint, and a peer that connected to us has one
    learned from its packets that we must not fight.
    """
    if desired.public_key != actual.public_key:
        return True
    if {canonical_cidr(c) for c in desired.allowed_ips} != {canonical_cidr(c) for c in actual.allowed_ips}:
        return True
    if desired.persistent_keepalive != actual.persistent_keepalive:
        return True
    if desired.endpoint is not None and canonical_endpoint(desired.endpoint) != canonical_endpoint(
        actual.endpoint
    ):
        return True
    return False


def plan(desired: Mapping[str, PeerConfig], actual: Mapping[str, PeerState]) -> PeerChanges:
    """The changes that turn `actual` into `desired`; both are keyed by public key.

    Output is sorted by public key so that equal inputs give equal plans (and equal logs). ValueError if a
    mapping key disagrees with its value's public_key, which would make the plan silently wrong.
    """
    for mapping in (desired, actual):
        for key, peer in mapping.items():
            if key != peer.public_key:
                raise ValueError(f"peer keyed {key!r} has public_key {peer.public_key!r}")
    upsert = tuple(
        desired[key]
        for key in sorted(desired)
        if key not in actual or peer_differs(desired[key], actual[key].config())
    )
    remove = tuple(key for key in sorted(actual) if key not in desired)
    return PeerChanges(upsert=upsert, remove=remove)
