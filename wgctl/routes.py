"""Addresses, link state and routes through rtnetlink (wgctl.netlink), in the caller's network namespace.

Every call opens its own short-lived netlink socket: the agent calls these when it reconciles, the cost is
small, and a fresh socket always talks to the namespace the process is in now (the lab runs each agent under
`ip netns exec`). "Already exists" (EEXIST) is success; each method says whether it changed anything.

wgctl's own netlink code rather than pyroute2: these are a handful of fixed requests, and importing pyroute2
(its package imports IPDB, NDB and every other module it has) made up a fifth of the agent's memory and of
its start-up time (docs/benchmarks.md, "agent footprint"). The kernel backend still uses pyroute2.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from wgctl import nlmsg
from wgctl.errors import InterfaceNotFoundError, InvalidConfigError, NetlinkError
from wgctl.netlink import NetlinkSocket

log = logging.getLogger(__name__)

IFF_UP = nlmsg.IFF_UP
MAIN_TABLE = 254


@contextmanager
def _rtnl(what: str) -> Iterator[NetlinkSocket]:
    """An rtnetlink socket; the kernel's errors become wgctl errors saying what was being done."""
    try:
        with NetlinkSocket() as sock:
            yield sock
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise InterfaceNotFoundError(f"{what}: no such interface") from exc
        raise NetlinkError(f"{what}: {exc}", code=exc.errno) from exc


def _link(sock: NetlinkSocket, ifname: str) -> nlmsg.Message | None:
    """The RTM_NEWLINK answer for `ifname`, None if there is no such interface."""
    try:
        (link,) = sock.request(
            nlmsg.RTM_GETLINK, nlmsg.ifinfomsg(), nlmsg.attr(nlmsg.IFLA_IFNAME, nlmsg.text(ifname))
        )
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
    return link


def _index(sock: NetlinkSocket, ifname: str) -> int:
    link = _link(sock, ifname)
    if link is None:
        raise InterfaceNotFoundError(f"interface {ifname} does not exist in this network namespace")
    return nlmsg.link_info(link)[0]


def link_exists(ifname: str) -> bool:
    """True if `ifname` exists in the current network namespace."""
    with _rtnl(f"look up {ifname}") as sock:
        return _link(sock, ifname) is not None


def delete_link(ifname: str) -> bool:
    """Delete `ifname` from the current namespace. True if it existed; no error if it did not."""
    with _rtnl(f"delete link {ifname}") as sock:
        link = _link(sock, ifname)
        if link is None:
            return False
        try:
            sock.request(nlmsg.RTM_DELLINK, nlmsg.ifinfomsg(nlmsg.link_info(link)[0]))
        except OSError as exc:
            # The link can vanish between lookup and delete (wireguard-go removes its TUN when it exits).
            if exc.errno == errno.ENODEV:
                return False
            raise
        return True


def interface_addresses() -> list[tuple[str, str, bool]]:
    """(interface name, address, link up) for every address of every interface in the current namespace."""
    with _rtnl("list interface addresses") as sock:
        links = {}
        for msg in sock.request(nlmsg.RTM_GETLINK, nlmsg.ifinfomsg(), flags=nlmsg.NLM_F_DUMP):
            index, flags = nlmsg.link_info(msg)
            if nlmsg.IFLA_IFNAME in msg.attrs:
                links[index] = (nlmsg.get_text(msg.attrs[nlmsg.IFLA_IFNAME]), bool(flags & IFF_UP))
        found = []
        for msg in sock.request(nlmsg.RTM_GETADDR, nlmsg.ifaddrmsg(socket.AF_UNSPEC), flags=nlmsg.NLM_F_DUMP):
            family, _, index = nlmsg.addr_info(msg)
            # IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS elsewhere.
            raw = msg.attrs.get(nlmsg.IFA_LOCAL) or msg.attrs.get(nlmsg.IFA_ADDRESS)
            if raw and index in links and family in (socket.AF_INET, socket.AF_INET6):
                ifname, up = links[index]
                found.append((ifname, nlmsg.get_ip(family, raw), up))
        return found


class NetlinkRoutes:
    """RouteBackend on the kernel's rtnetlink in the current network namespace."""

    name = "netlink"

    def ensure_address(self, ifname: str, address: str) -> bool:
        """Add `address` (CIDR) to `ifname` unless the same address and prefix is there. True if added."""
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError as exc:
            raise InvalidConfigError(f"{ifname}: bad address {address!r}") from exc
        family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        prefix = iface.network.prefixlen
        with _rtnl(f"add address {address} to {ifname}") as sock:
            index = _index(sock, ifname)
            for msg in sock.request(nlmsg.RTM_GETADDR, nlmsg.ifaddrmsg(family), flags=nlmsg.NLM_F_DUMP):
                _, msg_prefix, msg_index = nlmsg.addr_info(msg)
                raw = msg.attrs.get(nlmsg.IFA_ADDRESS)
                if msg_index == index and msg_prefix == prefix and raw == iface.ip.packed:
                    return False
            # As `ip address add` does: IFA_LOCAL is the address itself; IFA_ADDRESS the same (no peer).
            attrs = nlmsg.attr(nlmsg.IFA_LOCAL, iface.ip.packed) + nlmsg.attr(nlmsg.IFA_ADDRESS, iface.ip.packed)
            try:
                sock.request(
                    nlmsg.RTM_NEWADDR,
                    nlmsg.ifaddrmsg(family, prefixlen=prefix, index=index),
                    attrs,
                    flags=nlmsg.NLM_F_CREATE | nlmsg.NLM_F_EXCL,
                )
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    return False
                raise
        log.info("added address %s to %s", address, ifname)
        return True

    def ensure_up(self, ifname: str, *, mtu: int) -> bool:
        """Set `ifname` up with `mtu`. True if the MTU or the up flag changed."""
        with _rtnl(f"set {ifname} up with mtu {mtu}") as sock:
            link = _link(sock, ifname)
            if link is None:
                raise InterfaceNotFoundError(f"interface {ifname} does not exist in this network namespace")
            index, flags = nlmsg.link_info(link)
            change: dict[str, object] = {}
            attrs = b""
            if nlmsg.get_u32(link.attrs.get(nlmsg.IFLA_MTU, bytes(4))) != mtu:
                change["mtu"] = mtu
                attrs = nlmsg.attr(nlmsg.IFLA_MTU, nlmsg.u32(mtu))
            if not flags & IFF_UP:
                change["state"] = "up"
            if not change:
                return False
            up = IFF_UP if "state" in change else 0
            sock.request(nlmsg.RTM_NEWLINK, nlmsg.ifinfomsg(index, flags=up, change=up), attrs)
        log.info("set %s %s", ifname, change)
        return True

    def ensure_route(self, ifname: str, network: str) -> bool:
        """Route `network` via `ifname` in the main table, replacing a route to it elsewhere. True if changed."""
        try:
            net = ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise InvalidConfigError(f"{ifname}: bad network {network!r}") from exc
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        dst = net.network_address.packed
        with _rtnl(f"route {net} via {ifname}") as sock:
            index = _index(sock, ifname)
            existing = []
            for msg in sock.request(nlmsg.RTM_GETROUTE, nlmsg.rtmsg(family), flags=nlmsg.NLM_F_DUMP):
                _, dst_len, table = nlmsg.route_info(msg)
                # A default route (length 0) carries no RTA_DST.
                msg_dst = msg.attrs.get(nlmsg.RTA_DST, bytes(len(dst)))
                if table == MAIN_TABLE and dst_len == net.prefixlen and msg_dst == dst:
                    existing.append(msg)
            oif = nlmsg.u32(index)
            if any(r.attrs.get(nlmsg.RTA_OIF) == oif and nlmsg.RTA_GATEWAY not in r.attrs for r in existing):
                return False
            flags = nlmsg.NLM_F_CREATE | (nlmsg.NLM_F_REPLACE if existing else nlmsg.NLM_F_EXCL)
            attrs = nlmsg.attr(nlmsg.RTA_DST, dst) + nlmsg.attr(nlmsg.RTA_OIF, oif)
            try:
                sock.request(
                    nlmsg.RTM_NEWROUTE,
                    nlmsg.rtmsg(family, dst_len=net.prefixlen, table=MAIN_TABLE, unicast=True),
                    attrs,
                    flags=flags,
                )
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    return False
                raise
        log.info("%s route %s via %s", "replaced" if existing else "added", net, ifname)
        return True
