"""Addresses, link state and routes through rtnetlink (pyroute2), in the caller's network namespace.

Every call opens its own short-lived IPRoute socket: the agent calls these only when it reconciles, the cost is
small, and a fresh socket always talks to the namespace the process is in now (the lab runs each agent under
`ip netns exec`). "Already exists" (EEXIST) is success; each method says whether it changed anything.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

from wgctl.errors import InterfaceNotFoundError, InvalidConfigError, NetlinkError

log = logging.getLogger(__name__)

IFF_UP = 0x1
MAIN_TABLE = 254


@contextmanager
def _rtnl(what: str) -> Iterator[IPRoute]:
    """An IPRoute socket; pyroute2 and socket errors become wgctl NetlinkError saying what was being done."""
    try:
        with IPRoute() as ipr:
            yield ipr
    except PyrouteNetlinkError as exc:
        if exc.code == errno.ENODEV:
            raise InterfaceNotFoundError(f"{what}: no such interface") from exc
        raise NetlinkError(f"{what}: {exc}", code=exc.code) from exc
    except OSError as exc:
        raise NetlinkError(f"{what}: {exc}", code=exc.errno) from exc


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise InterfaceNotFoundError(f"interface {ifname} does not exist in this network namespace")
    return found[0]


def link_exists(ifname: str) -> bool:
    """True if `ifname` exists in the current network namespace."""
    with _rtnl(f"look up {ifname}") as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def delete_link(ifname: str) -> bool:
    """Delete `ifname` from the current namespace. True if it existed; no error if it did not."""
    with _rtnl(f"delete link {ifname}") as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except PyrouteNetlinkError as exc:
            # The link can vanish between lookup and delete (wireguard-go removes its TUN when it exits).
            if exc.code == errno.ENODEV:
                return False
            raise
        return True


class NetlinkRoutes:
    """RouteBackend on the kernel's rtnetlink in the current network namespace."""

    name = "netlink"

    def ensure_address(self, ifname: str, address: str) -> bool:
        """Add `address` (CIDR) to `ifname` unless the same address and prefix is there. True if added."""
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError as exc:
            raise InvalidConfigError(f"{ifname}: bad address {address!r}") from exc
        family = 2 if iface.version == 4 else 10
        ip, prefix = str(iface.ip), iface.network.prefixlen
        with _rtnl(f"add address {address} to {ifname}") as ipr:
            index = _index(ipr, ifname)
            for msg in ipr.get_addr(index=index, family=family):
                if msg.get("address") == ip and msg["prefixlen"] == prefix:
                    return False
            try:
                ipr.addr("add", index=index, address=ip, prefixlen=prefix)
            except PyrouteNetlinkError as exc:
                if exc.code == errno.EEXIST:
                    return False
                raise
        log.info("added address %s to %s", address, ifname)
        return True

    def ensure_up(self, ifname: str, *, mtu: int) -> bool:
        """Set `ifname` up with `mtu`. True if the MTU or the up flag changed."""
        with _rtnl(f"set {ifname} up with mtu {mtu}") as ipr:
            index = _index(ipr, ifname)
            link = ipr.get_links(index)[0]
            change: dict[str, object] = {}
            if link.get("mtu") != mtu:
                change["mtu"] = mtu
            if not link["flags"] & IFF_UP:
                change["state"] = "up"
            if not change:
                return False
            ipr.link("set", index=index, **change)
        log.info("set %s %s", ifname, change)
        return True

    def ensure_route(self, ifname: str, network: str) -> bool:
        """Route `network` via `ifname` in the main table, replacing a route to it elsewhere. True if changed."""
        try:
            net = ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise InvalidConfigError(f"{ifname}: bad network {network!r}") from exc
        family = 2 if net.version == 4 else 10
        dst = str(net.network_address)
        with _rtnl(f"route {net} via {ifname}") as ipr:
            index = _index(ipr, ifname)
            existing = [
                r
                for r in ipr.get_routes(family=family, table=MAIN_TABLE)
                if r["dst_len"] == net.prefixlen and (r.get("dst") or _unspecified(family)) == dst
            ]
            if any(r.get("oif") == index and not r.get("gateway") for r in existing):
                return False
            command = "replace" if existing else "add"
            try:
                ipr.route(command, dst=dst, dst_len=net.prefixlen, oif=index, table=MAIN_TABLE)
            except PyrouteNetlinkError as exc:
                if exc.code == errno.EEXIST:
                    return False
                raise
        log.info("%s route %s via %s", "replaced" if existing else "added", net, ifname)
        return True


def _unspecified(family: int) -> str:
    return "0.0.0.0" if family == 2 else "::"
