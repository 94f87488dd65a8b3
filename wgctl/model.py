"""The WireGuard control layer's types and interfaces. It knows nothing of meshes, members or brokers.

Backends (kernel via netlink, wireguard-go via its UAPI socket, in-memory) implement `WireGuardBackend`;
address/link/route handling implements `RouteBackend`. Every `ensure_*` call is idempotent and reports
whether it changed anything, so callers can log real changes and tests can assert that a second run is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """What we want a peer to look like. `allowed_ips` are CIDR strings; `endpoint` is host:port or None."""

    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    persistent_keepalive: int = 0


@dataclass(frozen=True, slots=True)
class PeerState:
    """A peer as read back from the interface, with its traffic counters."""

    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    persistent_keepalive: int = 0
    latest_handshake: float | None = None  # unix time, None if never
    rx_bytes: int = 0
    tx_bytes: int = 0

    def config(self) -> PeerConfig:
        """The configurable part of this state, comparable with a desired PeerConfig."""
        return PeerConfig(self.public_key, self.allowed_ips, self.endpoint, self.persistent_keepalive)


@dataclass(frozen=True, slots=True)
class InterfaceState:
    """An interface as read back: its keys, port and peers keyed by public key."""

    name: str
    public_key: str | None
    listen_port: int | None
    peers: dict[str, PeerState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PeerChanges:
    """The minimal update to apply: peers to add or update (full config each) and peers to remove."""

    upsert: tuple[PeerConfig, ...] = ()
    remove: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not self.upsert and not self.remove


class WireGuardBackend(Protocol):
    """One WireGuard implementation. All methods raise wgctl.errors.WireGuardError with context on failure."""

    def ensure_interface(self, name: str, *, private_key: str, listen_port: int) -> bool:
        """Create the interface if missing and set its private key and port if they differ. True if changed."""
        ...

    def read(self, name: str) -> InterfaceState:
        """The interface's current state; WireGuardError if it does not exist."""
        ...

    def apply(self, name: str, changes: PeerChanges) -> None:
        """Apply `changes` in one operation, touching no other peer."""
        ...

    def delete_interface(self, name: str) -> None:
        """Remove the interface (and stop a userspace process the backend started). No error if absent."""
        ...


class RouteBackend(Protocol):
    """Addresses, link state, MTU and routes of an interface. Idempotent; "already exists" is success."""

    def ensure_address(self, ifname: str, address: str) -> bool:
        """Make `address` (CIDR, e.g. 100.96.0.5/16) present on `ifname`. True if it was added."""
        ...

    def ensure_up(self, ifname: str, *, mtu: int) -> bool:
        """Set the link up with `mtu`. True if anything changed."""
        ...

    def ensure_route(self, ifname: str, network: str) -> bool:
        """Route `network` (CIDR) via `ifname`. True if it was added."""
        ...
