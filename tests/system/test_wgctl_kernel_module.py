"""The kernel WireGuard backend against the real module: lifecycle, peer updates, large dumps, a real tunnel.

Needs root and a kernel whose `wireguard` generic netlink family answers (the module loads on first use).
The development machine has no such kernel, so here these tests skip with that reason; the VM test
(tests/vm/test_vm_production.py) runs this file inside a Debian guest against the installed wheel.

Every test works in network namespaces it creates, entered with pyroute2's pushns (the backend opens its
netlink sockets in the calling thread); the tunnel test also reads its interface from another process
(`python -m wgctl.cli show` under `ip netns exec`), as a restarted agent would.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from netns import Namespace, NetnsLab, require_root
from polling import wait_for
from pyroute2 import IPRoute
from pyroute2.netns import popns, pushns

from wgctl import keys
from wgctl.backends import select_backend
from wgctl.diff import plan
from wgctl.errors import InterfaceNotFoundError, WireGuardError
from wgctl.kernel import KernelWireGuard, kernel_available
from wgctl.model import PeerChanges, PeerConfig
from wgctl.routes import NetlinkRoutes

pytestmark = pytest.mark.system


def _key(n: int) -> str:
    return base64.b64encode(n.to_bytes(2, "big") * 16).decode()


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    require_root("ip", "ping")
    if not kernel_available():
        pytest.skip(
            "kernel WireGuard unavailable: no 'wireguard' generic netlink family (module not built or not "
            "loadable); tests/vm runs these tests in a VM whose kernel has it"
        )
    with NetnsLab(prefix="wgk") as lab:
        yield lab


@contextmanager
def inside(ns: Namespace) -> Iterator[None]:
    """Run the block's netlink requests in `ns` (this thread only)."""
    pushns(ns.name)
    try:
        yield
    finally:
        popns()


def link_kind(ifname: str) -> str | None:
    """The rtnetlink kind of `ifname` in the current namespace ("wireguard" for a kernel link)."""
    with IPRoute() as ipr:
        (link,) = ipr.get_links(ifname=ifname)
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def test_auto_selects_the_kernel_backend(lab: NetnsLab) -> None:
    assert isinstance(select_backend("auto"), KernelWireGuard)
    assert isinstance(select_backend("kernel"), KernelWireGuard)


def test_interface_lifecycle_is_idempotent(lab: NetnsLab) -> None:
    ns = lab.namespace("a")
    ifname = lab.ifname("wg")
    private, other = keys.generate_private_key(), keys.generate_private_key()
    with inside(ns):
        wg = KernelWireGuard()
        with pytest.raises(InterfaceNotFoundError):
            wg.read(ifname)
        assert wg.ensure_interface(ifname, private_key=private, listen_port=51820) is True
        assert link_kind(ifname) == "wireguard"
        assert wg.ensure_interface(ifname, private_key=private, listen_port=51820) is False
        state = wg.read(ifname)
        assert (state.name, state.public_key, state.listen_port, state.peers) == (
            ifname, keys.public_key(private), 51820, {}
        )
        # A changed port or key is applied to the existing link, not by recreating it.
        assert wg.ensure_interface(ifname, private_key=private, listen_port=51999) is True
        assert wg.read(ifname).listen_port == 51999
        assert wg.ensure_interface(ifname, private_key=other, listen_port=51999) is True
        assert wg.read(ifname).public_key == keys.public_key(other)
        wg.delete_interface(ifname)
        with pytest.raises(InterfaceNotFoundError):
            wg.read(ifname)
        wg.delete_interface(ifname)  # absent: no error


def test_reading_a_link_that_is_not_wireguard_fails_cleanly(lab: NetnsLab) -> None:
    ns = lab.namespace("a")
    with inside(ns), pytest.raises(WireGuardError):
        KernelWireGuard().read("lo")


def test_peers_read_back_exactly_as_planned(lab: NetnsLab) -> None:
    ns = lab.namespace("a")
    ifname = lab.ifname("wg")
    desired = {
        p.public_key: p
        for p in (
            PeerConfig(_key(1), ("100.96.0.2/32",), "192.0.2.1:51820", 25),
            PeerConfig(_key(2), ("100.96.0.3/32", "10.20.0.0/16", "fd00::3/128"), "[2001:db8::7]:4500"),
            PeerConfig(_key(3), ()),
        )
    }
    with inside(ns):
        wg = KernelWireGuard()
        wg.ensure_interface(ifname, private_key=keys.generate_private_key(), listen_port=0)
        wg.apply(ifname, plan(desired, wg.read(ifname).peers))
        actual = wg.read(ifname).peers
        assert {k: p.config() for k, p in actual.items()} == desired
        # What the kernel reports is what the plan compares against: a converged interface plans nothing.
        assert plan(desired, actual).is_empty()

        # Update one peer (endpoint, allowed IPs replaced, keepalive off) and remove another.
        desired[_key(1)] = PeerConfig(_key(1), ("100.96.0.9/32",), "198.51.100.4:1234", 0)
        del desired[_key(3)]
        changes = plan(desired, wg.read(ifname).peers)
        assert [p.public_key for p in changes.upsert] == [_key(1)] and changes.remove == (_key(3),)
        wg.apply(ifname, changes)
        assert {k: p.config() for k, p in wg.read(ifname).peers.items()} == desired
        wg.apply(ifname, PeerChanges())  # empty: nothing sent


def test_a_large_device_is_merged_from_several_dump_messages(lab: NetnsLab) -> None:
    # 300 peers with 4 allowed IPs each do not fit one netlink message: the kernel splits the dump, and a
    # peer's allowed IPs may continue in the next message.
    ns = lab.namespace("a")
    ifname = lab.ifname("wg")
    desired = {}
    for n in range(1, 301):
        ips = (f"100.96.{n // 256}.{n % 256}/32", f"10.{n // 256}.{n % 256}.0/24", f"fd00::{n:x}/128",
               f"fd01:{n:x}::/64")
        desired[_key(n)] = PeerConfig(_key(n), ips, f"192.0.2.{n % 250 + 1}:{20000 + n}", 25)
    with inside(ns):
        wg = KernelWireGuard()
        wg.ensure_interface(ifname, private_key=keys.generate_private_key(), listen_port=0)
        wg.apply(ifname, PeerChanges(upsert=tuple(desired.values())))
        actual = wg.read(ifname).peers
        assert len(actual) == 300
        assert {k: p.config() for k, p in actual.items()} == desired


def test_two_namespaces_tunnel_through_kernel_links(lab: NetnsLab, tmp_path: Path) -> None:
    a, b = lab.namespace("a"), lab.namespace("b")
    lab.link(a, b, "10.77.0.1/24", "10.77.0.2/24")
    nodes = {
        ns.name: {"ns": ns, "ifname": lab.ifname("wg"), "host": host, "mesh_ip": mesh_ip,
                  "private": keys.generate_private_key()}
        for ns, host, mesh_ip in ((a, "10.77.0.1", "100.96.7.1"), (b, "10.77.0.2", "100.96.7.2"))
    }
    na, nb = nodes[a.name], nodes[b.name]

    def converge(me: dict, peers: list[dict]) -> PeerChanges:
        desired = {
            keys.public_key(p["private"]): PeerConfig(
                keys.public_key(p["private"]), (f"{p['mesh_ip']}/32",), f"{p['host']}:51820"
            )
            for p in peers
        }
        with inside(me["ns"]):
            wg, routes = KernelWireGuard(), NetlinkRoutes()
            wg.ensure_interface(me["ifname"], private_key=me["private"], listen_port=51820)
            routes.ensure_address(me["ifname"], f"{me['mesh_ip']}/24")
            routes.ensure_up(me["ifname"], mtu=1420)
            changes = plan(desired, wg.read(me["ifname"]).peers)
            wg.apply(me["ifname"], changes)
            return changes

    for me, other in ((na, nb), (nb, na)):
        assert [p.public_key for p in converge(me, [other]).upsert] == [keys.public_key(other["private"])]
    wait_for(lambda: a.ping(nb["mesh_ip"]), timeout=15, interval=0.1, what="ping a -> b through kernel WireGuard")
    assert b.ping(na["mesh_ip"])
    assert converge(na, [nb]).is_empty()

    # Another process (as after an agent restart) reads the same interface, with the handshake and traffic.
    shown = a.python("-m", "wgctl.cli", "--backend", "kernel", "show", na["ifname"], "--json", check=False)
    assert shown.returncode == 0, shown.stderr
    (peer,) = json.loads(shown.stdout)["peers"]
    assert peer["latest_handshake"] is not None and peer["endpoint"] == "10.77.0.2:51820"
    assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0

    assert converge(na, []).remove == (keys.public_key(nb["private"]),)
    assert not a.ping(nb["mesh_ip"], wait=1)
    for n in (na, nb):
        with inside(n["ns"]):
            KernelWireGuard().delete_interface(n["ifname"])
        assert n["ifname"] not in n["ns"].run("ip", "-o", "link").stdout
