"""WireGuard in the Linux kernel, through the `wireguard` generic netlink family (pyroute2).

The development machine has no WireGuard module: there the message parsing is tested on messages pyroute2
itself encodes and decodes (tests/unit/test_wgctl_kernel.py), and the backend against the real module inside
a QEMU guest (tests/system/test_wgctl_kernel_module.py, run by tests/vm); see docs/wgctl.md.

pyroute2's WireGuard.set() carries one peer per netlink message, so `apply` sends removals first and then
one message per upsert. Each message is atomic in the kernel; the whole apply is not (neither is `wg
setconf`, which splits large configurations too). A failure part-way raises, and the next plan/apply
converges from whatever was applied.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError
from pyroute2.netlink.generic.wireguard import WG_GENL_NAME

from wgctl import keys
from wgctl.diff import split_endpoint, validated_peer
from wgctl.errors import BackendUnavailableError, InterfaceNotFoundError, NetlinkError
from wgctl.model import InterfaceState, PeerChanges, PeerConfig, PeerState
from wgctl.netlink import genl_family_exists
from wgctl.uapi import UapiDevice

log = logging.getLogger(__name__)

_ENOENT = 2
_ENODEV = 19


def kernel_available() -> bool:
    """True if the kernel's `wireguard` generic netlink family answers (the module is loaded)."""
    return genl_family_exists(WG_GENL_NAME)


@contextmanager
def _netlink(what: str, name: str) -> Iterator[None]:
    try:
        yield
    except PyrouteNetlinkError as exc:
        if exc.code in (_ENODEV, _ENOENT):
            raise InterfaceNotFoundError(f"{what} {name}: no such WireGuard interface ({exc})") from exc
        raise NetlinkError(f"{what} {name}: {exc}", code=exc.code) from exc
    except OSError as exc:
        raise NetlinkError(f"{what} {name}: {exc}", code=exc.errno) from exc


def _text(value: Any) -> str:
    # pyroute2 returns keys as base64 bytes.
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def device_from_messages(messages: Iterable[Any]) -> UapiDevice:
    """Merge the messages of one WG_CMD_GET_DEVICE dump into a device. No I/O here.

    A large device arrives in several messages, and one peer's allowed IPs can continue in the next
    message under the same public key, so peers are merged by key rather than replaced.
    """
    private_key: str | None = None
    listen_port: int | None = None
    fwmark = 0
    peers: dict[str, dict[str, Any]] = {}
    for msg in messages:
        if msg.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None:
            private_key = _text(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"))
        if msg.get_attr("WGDEVICE_A_LISTEN_PORT") is not None:
            listen_port = int(msg.get_attr("WGDEVICE_A_LISTEN_PORT"))
        if msg.get_attr("WGDEVICE_A_FWMARK") is not None:
            fwmark = int(msg.get_attr("WGDEVICE_A_FWMARK"))
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _text(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            entry = peers.setdefault(key, {"allowed_ips": []})
            endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
            if endpoint is not None and endpoint.get("addr"):
                addr = endpoint["addr"]
                entry["endpoint"] = (
                    f"[{addr}]:{endpoint['port']}" if ":" in addr else f"{addr}:{endpoint['port']}"
                )
            handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            if handshake is not None and (handshake["tv_sec"] or handshake["tv_nsec"]):
                entry["latest_handshake"] = handshake["tv_sec"] + handshake["tv_nsec"] / 1e9
            for attr, field in (
                ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", "persistent_keepalive"),
                ("WGPEER_A_RX_BYTES", "rx_bytes"),
                ("WGPEER_A_TX_BYTES", "tx_bytes"),
            ):
                if peer.get_attr(attr) is not None:
                    entry[field] = int(peer.get_attr(attr))
            for allowed in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                if allowed.get("addr"):
                    entry["allowed_ips"].append(allowed["addr"])
    return UapiDevice(
        private_key=private_key,
        listen_port=listen_port,
        fwmark=fwmark,
        peers={
            key: PeerState(public_key=key, **{**entry, "allowed_ips": tuple(entry["allowed_ips"])})
            for key, entry in peers.items()
        },
    )


def peer_request(peer: PeerConfig) -> dict[str, Any]:
    """The pyroute2 peer dict for an upsert: full allowed IPs (replacing), keepalive, endpoint if any."""
    valid = validated_peer(peer)
    request: dict[str, Any] = {
        "public_key": valid.public_key,
        "persistent_keepalive": valid.persistent_keepalive,
        "replace_allowed_ips": True,
        "allowed_ips": list(valid.allowed_ips),
    }
    if valid.endpoint is not None:
        request["endpoint_addr"], request["endpoint_port"] = split_endpoint(valid.endpoint)
    return request


def _zero_key() -> str:
    return base64.b64encode(bytes(keys.KEY_LEN)).decode()


class KernelWireGuard:
    """WireGuardBackend on the kernel module via generic netlink, in the current network namespace."""

    name = "kernel"

    def __init__(self) -> None:
        if not kernel_available():
            raise BackendUnavailableError(
                "the kernel has no wireguard generic netlink family (module not loaded)"
            )
        self._lock = threading.Lock()

    def ensure_interface(self, name: str, *, private_key: str, listen_port: int) -> bool:
        """Create the `wireguard` link if missing; set key and port if they differ. True if changed."""
        keys.decode_key(private_key)
        with self._lock:
            created = False
            with _netlink("create", name), IPRoute() as ipr:
                if not ipr.link_lookup(ifname=name):
                    ipr.link("add", ifname=name, kind="wireguard")
                    created = True
            device = self._device(name)
            new_key = private_key if device.private_key != private_key else None
            new_port = listen_port if listen_port and device.listen_port != listen_port else None
            if new_key is None and new_port is None:
                return created
            with _netlink("configure", name), WireGuard() as wg:
                wg.set(name, private_key=new_key, listen_port=new_port)
            return True

    def read(self, name: str) -> InterfaceState:
        """The interface's state; InterfaceNotFoundError if there is no such WireGuard link."""
        return self._device(name).state(name)

    def apply(self, name: str, changes: PeerChanges) -> None:
        """Removals first, then one netlink message per upsert (see the module docstring)."""
        if changes.is_empty():
            return
        for key in changes.remove:
            keys.decode_key(key)
        requests = [peer_request(peer) for peer in changes.upsert]
        with _netlink("apply peers to", name), WireGuard() as wg:
            for key in changes.remove:
                wg.set(name, peer={"public_key": key, "remove": True})
            for request in requests:
                wg.set(name, peer=request)

    def delete_interface(self, name: str) -> None:
        """Delete the link; no error if absent."""
        with self._lock, _netlink("delete", name), IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])
                log.info("deleted interface %s", name)

    def _device(self, name: str) -> UapiDevice:
        with _netlink("read", name), WireGuard() as wg:
            device = device_from_messages(wg.info(name))
        # The kernel reports an unset private key as absent; treat an all-zero one the same way.
        if device.private_key == _zero_key():
            return UapiDevice(None, device.listen_port, device.fwmark, device.peers)
        return device
