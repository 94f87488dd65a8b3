"""Mesh IP allocation. Pure: no I/O, `now` is passed in, every operation returns a new Ipam.

Deterministic: an owner gets the lowest free host address of the mesh network (network and broadcast
addresses skipped), and keeps it while it holds it. A released address is quarantined for `quarantine_s`
seconds: only its previous owner may take it back during that time, so an AllowedIPs entry that a slow or
partitioned peer still holds for the old owner never routes a newcomer's traffic to the wrong key.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from registrar.errors import PoolExhausted

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A released address nobody but `owner` may take before `until`."""

    ip: str
    owner: str
    until: float


def host_range(network: IPNetwork) -> tuple[int, int]:
    """First and last assignable address of `network` as integers (inclusive).

    IPv4 networks larger than /31 lose their network and broadcast address; /31 and /32 (RFC 3021) and IPv6
    use every address except, for IPv6, the subnet-router anycast address (the network address).
    """
    first, last = int(network.network_address), int(network.broadcast_address)
    if network.version == 4 and network.prefixlen >= 31:
        return first, last
    if network.version == 4:
        return first + 1, last - 1
    return first + 1, last


@dataclass(frozen=True, slots=True)
class Ipam:
    """Who holds which address and which addresses sit in quarantine. Owners are node ids."""

    network: IPNetwork
    quarantine_s: float
    allocated: Mapping[str, str] = field(default_factory=lambda: _EMPTY)  # owner -> ip
    quarantine: Mapping[str, Quarantined] = field(default_factory=lambda: _EMPTY)  # ip -> entry
    # Held and quarantined addresses as integers: derived, kept in step so allocation never re-parses them.
    used: frozenset[int] = frozenset()

    @classmethod
    def create(
        cls,
        network: str,
        *,
        quarantine_s: float,
        allocated: Mapping[str, str] | None = None,
        quarantine: list[Quarantined] | tuple[Quarantined, ...] = (),
    ) -> Ipam:
        """An Ipam for `network` (a CIDR string), optionally restored from a store."""
        net = ipaddress.ip_network(network, strict=True)
        if quarantine_s < 0:
            raise ValueError("quarantine_s must be >= 0")
        alloc = dict(allocated or {})
        if len(set(alloc.values())) != len(alloc):
            raise ValueError("two owners hold the same address")
        to_int = _to_int(net)
        used = frozenset(map(to_int, alloc.values())) | frozenset(to_int(q.ip) for q in quarantine)
        return cls(
            net, quarantine_s, MappingProxyType(alloc), MappingProxyType({q.ip: q for q in quarantine}), used
        )

    @property
    def prefix_len(self) -> int:
        return self.network.prefixlen

    def ip_of(self, owner: str) -> str | None:
        """The address `owner` holds, or None."""
        return self.allocated.get(owner)

    def expire(self, *, now: float) -> Ipam:
        """Drop quarantine entries whose time is up (`until <= now`)."""
        if not any(q.until <= now for q in self.quarantine.values()):
            return self
        kept = {ip: q for ip, q in self.quarantine.items() if q.until > now}
        to_int = _to_int(self.network)
        freed = frozenset(to_int(ip) for ip in self.quarantine if ip not in kept)
        return replace(self, quarantine=MappingProxyType(kept), used=self.used - freed)

    def allocate(self, owner: str, *, now: float) -> tuple[Ipam, str]:
        """Give `owner` an address: the one it holds, its own quarantined one, else the lowest free one.

        Raises PoolExhausted when no address is free.
        """
        held = self.allocated.get(owner)
        if held is not None:
            return self, held
        state = self.expire(now=now)
        for q in state.quarantine.values():
            if q.owner == owner:
                quarantine = {ip: e for ip, e in state.quarantine.items() if ip != q.ip}
                return state._with(owner, q.ip, quarantine), q.ip
        first, last = host_range(state.network)
        value = first
        used = state.used
        while value in used:  # lowest free address
            value += 1
        if value > last:
            raise PoolExhausted(f"no free address in {state.network} ({len(used)} held or quarantined)")
        ip = str(ipaddress.ip_address(value))
        new = state._with(owner, ip, state.quarantine.copy())
        return replace(new, used=used | {value}), ip

    def release(self, owner: str, *, now: float) -> Ipam:
        """Free `owner`'s address into quarantine until now + quarantine_s. Unknown owners: no change."""
        ip = self.allocated.get(owner)
        if ip is None:
            return self
        allocated = {o: a for o, a in self.allocated.items() if o != owner}
        quarantine = self.quarantine.copy()
        used = self.used
        if self.quarantine_s > 0:
            quarantine[ip] = Quarantined(ip, owner, now + self.quarantine_s)
        else:
            used = used - {_to_int(self.network)(ip)}
        return replace(
            self, allocated=MappingProxyType(allocated), quarantine=MappingProxyType(quarantine), used=used
        )

    def _with(self, owner: str, ip: str, quarantine: dict[str, Quarantined]) -> Ipam:
        allocated = self.allocated.copy()
        allocated[owner] = ip
        return replace(self, allocated=MappingProxyType(allocated), quarantine=MappingProxyType(quarantine))


def _to_int(network: IPNetwork) -> Callable[[str], int]:
    return _v4_int if network.version == 4 else _v6_int


def _v4_int(ip: str) -> int:
    # socket.inet_aton is ~10x faster than ipaddress for the conversion done once per held address.
    return int.from_bytes(socket.inet_aton(ip), "big")


def _v6_int(ip: str) -> int:
    return int(ipaddress.IPv6Address(ip))
