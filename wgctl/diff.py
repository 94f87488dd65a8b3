"""The pure plan from actual to desired peers. No I/O here.

`plan` compares what a node wants with what its interface has and returns the smallest PeerChanges that
closes the gap: add missing peers, update changed ones (with their full config), remove extra ones, and never
mention a peer that is already right — so re-running it on a converged interface yields an empty plan.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping

from wgctl import keys
from wgctl.errors import InvalidConfigError
from wgctl.model import PeerChanges, PeerConfig, PeerState


@functools.lru_cache(maxsize=65536)
def canonical_cidr(cidr: str) -> str:
    """A CIDR as WireGuard reports it: host bits cleared, IPv6 compressed (10.0.0.5/24 -> 10.0.0.0/24).

    A bare address gets the full prefix (/32 or /128). ValueError if it is not an IP network.
    """
    return str(ipaddress.ip_network(cidr.strip(), strict=False))


@functools.lru_cache(maxsize=65536)
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


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """(address, port) of an `IP:port` / `[IPv6]:port` endpoint; InvalidConfigError for anything else.

    Backends take IP literals only: neither wireguard-go's UAPI nor the kernel resolves names, and a name
    would never compare equal to the address WireGuard reports back.
    """
    host, sep, port = endpoint.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        # Unbracketed IPv6 is ambiguous (is the last group the port?); Go's SplitHostPort refuses it too.
        raise InvalidConfigError(f"endpoint {endpoint!r}: write IPv6 endpoints as [address]:port")
    try:
        addr = ipaddress.ip_address(host)
        number = int(port)
    except ValueError as exc:
        raise InvalidConfigError(f"endpoint {endpoint!r} is not IP:port") from exc
    if not sep or not 0 < number < 65536:
        raise InvalidConfigError(f"endpoint {endpoint!r} has no valid port")
    return str(addr), number


def validated_peer(peer: PeerConfig) -> PeerConfig:
    """`peer` as WireGuard would store it: canonical CIDRs (deduplicated, in order) and endpoint.

    InvalidKeyError for a bad public key, InvalidConfigError for a bad CIDR, endpoint or keepalive.
    """
    keys.decode_key(peer.public_key)
    try:
        cidrs = tuple(dict.fromkeys(canonical_cidr(c) for c in peer.allowed_ips))
    except ValueError as exc:
        raise InvalidConfigError(f"peer {peer.public_key}: bad allowed IP: {exc}") from exc
    if not 0 <= peer.persistent_keepalive <= 65535:
        raise InvalidConfigError(
            f"peer {peer.public_key}: keepalive {peer.persistent_keepalive} out of range"
        )
    endpoint = None
    if peer.endpoint is not None:
        split_endpoint(peer.endpoint)
        endpoint = canonical_endpoint(peer.endpoint)
    return PeerConfig(peer.public_key, cidrs, endpoint, peer.persistent_keepalive)


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
