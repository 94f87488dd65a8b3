"""In-memory WireGuard and route backends: real implementations of the interfaces, without a kernel.

They follow WireGuard's observable semantics closely enough for agent tests to be meaningful:
`apply` touches only the peers it names and is all-or-nothing; an update replaces allowed IPs, keeps the
endpoint when none is given and keeps handshake time and counters; an allowed IP belongs to at most one peer
per interface (giving it to another peer takes it away from the first, as WireGuard's routing table does).
Every mutation is appended to `operations`, so a test can assert that a re-run touched nothing.
"""

from __future__ import annotations

import ipaddress
import itertools
import threading
from dataclasses import dataclass, field, replace

from wgctl import keys
from wgctl.diff import canonical_cidr, validated_peer
from wgctl.errors import InterfaceNotFoundError, InvalidConfigError, WireGuardError
from wgctl.model import InterfaceState, PeerChanges, PeerConfig, PeerState


@dataclass(frozen=True, slots=True)
class Operation:
    """One recorded mutation: `kind` is what happened, `interface` where, `peer` the public key if any.

    Kinds: create_interface, set_private_key, set_listen_port, delete_interface, add_peer, update_peer,
    remove_peer; for routes: add_address, set_up, set_mtu, add_route, replace_route.
    """

    kind: str
    interface: str
    peer: str | None = None
    detail: str | None = None


@dataclass(slots=True)
class _Interface:
    ident: int
    private_key: str
    listen_port: int
    peers: dict[str, PeerState] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # allowed IP -> public key, like WireGuard's trie


class InMemoryWireGuard:
    """A WireGuardBackend holding interfaces in a dict. Thread-safe; one instance models one machine."""

    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interfaces: dict[str, _Interface] = {}
        self._ids = itertools.count(1)
        self._failures: dict[str, list[WireGuardError]] = {}
        self.operations: list[Operation] = []
        self.apply_calls = 0
        self._routes: InMemoryRoutes | None = None

    @property
    def routes(self) -> InMemoryRoutes:
        """The routes of this machine: one InMemoryRoutes bound to this backend, made on first use."""
        with self._lock:
            if self._routes is None:
                self._routes = InMemoryRoutes(self)
            return self._routes

    # -- WireGuardBackend -------------------------------------------------------------------------------
    def ensure_interface(self, name: str, *, private_key: str, listen_port: int) -> bool:
        """Create `name` if missing; set key and port if they differ (port 0: any). True if anything changed."""
        keys.decode_key(private_key)
        with self._lock:
            self._maybe_fail("ensure_interface")
            iface = self._interfaces.get(name)
            if iface is None:
                self._interfaces[name] = _Interface(next(self._ids), private_key, listen_port)
                self._record("create_interface", name)
                return True
            changed = False
            if iface.private_key != private_key:
                iface.private_key = private_key
                self._record("set_private_key", name)
                changed = True
            # 0 asks for "any port", like the real backends: an interface already listening keeps its port.
            if listen_port and iface.listen_port != listen_port:
                iface.listen_port = listen_port
                self._record("set_listen_port", name, detail=str(listen_port))
                changed = True
            return changed

    def read(self, name: str) -> InterfaceState:
        """A snapshot of `name`; InterfaceNotFoundError if it does not exist."""
        with self._lock:
            self._maybe_fail("read")
            iface = self._get(name)
            return InterfaceState(
                name=name,
                public_key=keys.public_key(iface.private_key),
                listen_port=iface.listen_port,
                peers=dict(iface.peers),
            )

    def apply(self, name: str, changes: PeerChanges) -> None:
        """Apply all of `changes` or, if any part is invalid, none of it."""
        # Validate everything before mutating, like a UAPI set that fails before touching the device.
        prepared = [validated_peer(peer) for peer in changes.upsert]
        for key in changes.remove:
            keys.decode_key(key)
        with self._lock:
            self._maybe_fail("apply")
            iface = self._get(name)
            self.apply_calls += 1
            for key in changes.remove:
                old = iface.peers.pop(key, None)
                if old is not None:
                    for cidr in old.allowed_ips:
                        iface.owners.pop(cidr, None)
                    self._record("remove_peer", name, peer=key)
            for peer in prepared:
                self._upsert(name, iface, peer)

    def delete_interface(self, name: str) -> None:
        """Remove `name`; no error if it does not exist."""
        with self._lock:
            self._maybe_fail("delete_interface")
            if self._interfaces.pop(name, None) is not None:
                self._record("delete_interface", name)

    # -- test and simulation helpers --------------------------------------------------------------------
    def interface_id(self, name: str) -> int | None:
        """A number unique to this incarnation of `name` (None if absent); changes when it is re-created."""
        with self._lock:
            iface = self._interfaces.get(name)
            return None if iface is None else iface.ident

    def interfaces(self) -> list[str]:
        """Names of existing interfaces, sorted."""
        with self._lock:
            return sorted(self._interfaces)

    def simulate_handshake(
        self, name: str, public_key: str, *, at: float, rx_bytes: int = 0, tx_bytes: int = 0
    ) -> None:
        """Pretend `public_key` completed a handshake at `at` and moved traffic (adds to the counters)."""
        with self._lock:
            iface = self._get(name)
            peer = iface.peers.get(public_key)
            if peer is None:
                raise WireGuardError(f"{name}: no peer {public_key}")
            iface.peers[public_key] = replace(
                peer,
                latest_handshake=at,
                rx_bytes=peer.rx_bytes + rx_bytes,
                tx_bytes=peer.tx_bytes + tx_bytes,
            )

    def fail_next(self, method: str, error: WireGuardError) -> None:
        """Make the next call of `method` (e.g. "apply") raise `error` before doing anything."""
        with self._lock:
            self._failures.setdefault(method, []).append(error)

    def clear_operations(self) -> None:
        """Forget recorded operations (e.g. after setting up a test's starting state)."""
        with self._lock:
            self.operations.clear()
            self.apply_calls = 0

    def touched_peers(self, name: str | None = None) -> set[str]:
        """Public keys of peers that any recorded operation (on `name`, if given) changed."""
        with self._lock:
            return {
                op.peer
                for op in self.operations
                if op.peer is not None and (name is None or op.interface == name)
            }

    # -- internals --------------------------------------------------------------------------------------
    def _get(self, name: str) -> _Interface:
        iface = self._interfaces.get(name)
        if iface is None:
            raise InterfaceNotFoundError(f"interface {name} does not exist")
        return iface

    def _maybe_fail(self, method: str) -> None:
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)

    def _record(
        self, kind: str, interface: str, *, peer: str | None = None, detail: str | None = None
    ) -> None:
        self.operations.append(Operation(kind, interface, peer, detail))

    def _upsert(self, name: str, iface: _Interface, peer: PeerConfig) -> None:
        # An allowed IP routes to one peer only: WireGuard moves it from whichever peer had it before.
        taken: dict[str, set[str]] = {}
        for cidr in peer.allowed_ips:
            owner = iface.owners.get(cidr)
            if owner is not None and owner != peer.public_key:
                taken.setdefault(owner, set()).add(cidr)
        for other_key, cidrs in sorted(taken.items()):
            other = iface.peers[other_key]
            iface.peers[other_key] = replace(
                other, allowed_ips=tuple(c for c in other.allowed_ips if c not in cidrs)
            )
            self._record("update_peer", name, peer=other_key, detail="allowed_ips taken by another peer")
        old = iface.peers.get(peer.public_key)
        for cidr in old.allowed_ips if old is not None else ():
            iface.owners.pop(cidr, None)
        for cidr in peer.allowed_ips:
            iface.owners[cidr] = peer.public_key
        if old is None:
            iface.peers[peer.public_key] = PeerState(
                public_key=peer.public_key,
                allowed_ips=peer.allowed_ips,
                endpoint=peer.endpoint,
                persistent_keepalive=peer.persistent_keepalive,
            )
            self._record("add_peer", name, peer=peer.public_key)
            return
        iface.peers[peer.public_key] = replace(
            old,
            allowed_ips=peer.allowed_ips,
            endpoint=peer.endpoint if peer.endpoint is not None else old.endpoint,
            persistent_keepalive=peer.persistent_keepalive,
        )
        self._record("update_peer", name, peer=peer.public_key)


@dataclass(slots=True)
class _Link:
    ident: int | None
    up: bool = False
    mtu: int = 1420
    addresses: list[str] = field(default_factory=list)  # interface addresses, e.g. "100.96.0.5/16"


class InMemoryRoutes:
    """A RouteBackend over a dict, with the kernel's observable behaviour.

    Given `wireguard`, links are the interfaces that backend has: operations on a missing interface raise
    InterfaceNotFoundError, and deleting and re-creating an interface drops its addresses and routes, as the
    kernel does. Without it, any interface name is accepted. Like the kernel, an address on an up link
    implies a connected route to its network, so `ensure_route` to that network reports "nothing changed".
    """

    def __init__(self, wireguard: InMemoryWireGuard | None = None) -> None:
        self._lock = threading.Lock()
        self._wireguard = wireguard
        self._links: dict[str, _Link] = {}
        self._routes: dict[str, str] = {}  # destination network -> interface (one main table)
        self.operations: list[Operation] = []

    def ensure_address(self, ifname: str, address: str) -> bool:
        """Add `address` (CIDR) to `ifname` unless it is there. True if added."""
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError as exc:
            raise InvalidConfigError(f"{ifname}: bad address {address!r}") from exc
        with self._lock:
            link = self._link(ifname)
            text = str(iface)
            if text in link.addresses:
                return False
            link.addresses.append(text)
            self.operations.append(Operation("add_address", ifname, detail=text))
            return True

    def ensure_up(self, ifname: str, *, mtu: int) -> bool:
        """Set `ifname` up with `mtu`. True if either changed."""
        with self._lock:
            link = self._link(ifname)
            changed = False
            if link.mtu != mtu:
                link.mtu = mtu
                self.operations.append(Operation("set_mtu", ifname, detail=str(mtu)))
                changed = True
            if not link.up:
                link.up = True
                self.operations.append(Operation("set_up", ifname))
                changed = True
            return changed

    def ensure_route(self, ifname: str, network: str) -> bool:
        """Route `network` via `ifname`, replacing a route to it via another interface. True if changed."""
        try:
            net = canonical_cidr(network)
        except ValueError as exc:
            raise InvalidConfigError(f"{ifname}: bad network {network!r}") from exc
        with self._lock:
            self._link(ifname)
            current = self._route_table().get(net)
            if current == ifname:
                return False
            kind = "add_route" if current is None else "replace_route"
            self._routes[net] = ifname
            self.operations.append(Operation(kind, ifname, detail=net))
            return True

    # -- inspection -------------------------------------------------------------------------------------
    def addresses(self, ifname: str) -> list[str]:
        """Addresses on `ifname` in the order they were added."""
        with self._lock:
            return list(self._link(ifname).addresses)

    def link(self, ifname: str) -> tuple[bool, int]:
        """(up, mtu) of `ifname`."""
        with self._lock:
            link = self._link(ifname)
            return link.up, link.mtu

    def routes(self) -> dict[str, str]:
        """The routing table: destination network -> interface, connected routes included."""
        with self._lock:
            return self._route_table()

    # -- internals --------------------------------------------------------------------------------------
    def _link(self, ifname: str) -> _Link:
        ident = None
        if self._wireguard is not None:
            ident = self._wireguard.interface_id(ifname)
            if ident is None:
                self._forget(ifname)
                raise InterfaceNotFoundError(f"interface {ifname} does not exist")
        link = self._links.get(ifname)
        if link is None or link.ident != ident:
            # A new incarnation of the interface starts bare, as a re-created kernel link does.
            self._forget(ifname)
            link = self._links[ifname] = _Link(ident)
        return link

    def _forget(self, ifname: str) -> None:
        self._links.pop(ifname, None)
        for net in [n for n, dev in self._routes.items() if dev == ifname]:
            del self._routes[net]

    def _route_table(self) -> dict[str, str]:
        live = {
            name
            for name, link in self._links.items()
            if self._wireguard is None or self._wireguard.interface_id(name) == link.ident
        }
        table = {net: dev for net, dev in self._routes.items() if dev in live}
        for name in sorted(live):
            link = self._links[name]
            if link.up:
                for addr in link.addresses:
                    table.setdefault(str(ipaddress.ip_interface(addr).network), name)
        return table
