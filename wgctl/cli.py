"""`python -m wgctl.cli`: a small operator and test tool for one WireGuard interface in this namespace.

    wgctl show IF [--json]              the interface as read back (no private key)
    wgctl apply IF --json FILE          converge IF on FILE's desired state; prints what changed as JSON
    wgctl delete IF                     remove the interface (stops wireguard-go)
    wgctl genkey | wgctl pubkey         like `wg genkey` / `wg pubkey`

FILE (JSON): {"private_key_file": PATH, "listen_port": N, "address": CIDR, "mtu": N,
              "peers": [{"public_key": K, "allowed_ips": [CIDR...], "endpoint": "IP:PORT",
                         "persistent_keepalive": N}], "routes": [CIDR...]}
Every key is optional except "peers", which is the complete desired peer list: peers not in it are removed.
Run it under `ip netns exec NS` to act inside a network namespace.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from wgctl import keys
from wgctl.backends import BACKEND_NAMES, routes_for, select_backend
from wgctl.diff import plan
from wgctl.errors import WireGuardError
from wgctl.model import InterfaceState, PeerConfig, WireGuardBackend


def state_to_json(state: InterfaceState, *, now: float) -> dict[str, Any]:
    """A JSON-ready view of `state`; `handshake_age` is seconds before `now` (None if never)."""
    return {
        "name": state.name,
        "public_key": state.public_key,
        "listen_port": state.listen_port,
        "peers": [
            {
                "public_key": p.public_key,
                "allowed_ips": list(p.allowed_ips),
                "endpoint": p.endpoint,
                "persistent_keepalive": p.persistent_keepalive,
                "latest_handshake": p.latest_handshake,
                "handshake_age": None if p.latest_handshake is None else round(now - p.latest_handshake, 3),
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
            }
            for p in sorted(state.peers.values(), key=lambda p: p.public_key)
        ],
    }


def peers_from_json(items: list[dict[str, Any]]) -> dict[str, PeerConfig]:
    """Desired peers keyed by public key, from the "peers" list of an apply file."""
    peers = {}
    for item in items:
        peer = PeerConfig(
            public_key=item["public_key"],
            allowed_ips=tuple(item.get("allowed_ips", ())),
            endpoint=item.get("endpoint"),
            persistent_keepalive=int(item.get("persistent_keepalive", 0)),
        )
        peers[peer.public_key] = peer
    return peers


def apply_file(backend: WireGuardBackend, ifname: str, desired: dict[str, Any]) -> dict[str, Any]:
    """Converge `ifname` on `desired` (the parsed apply file); returns what changed."""
    result: dict[str, Any] = {"interface": False, "address": False, "up": False, "routes": []}
    if "private_key_file" in desired:
        private_key = keys.read_private_key(desired["private_key_file"])
        result["interface"] = backend.ensure_interface(
            ifname, private_key=private_key, listen_port=int(desired.get("listen_port", 0))
        )
    routes = routes_for(backend)
    if "address" in desired:
        result["address"] = routes.ensure_address(ifname, desired["address"])
    if "mtu" in desired:
        result["up"] = routes.ensure_up(ifname, mtu=int(desired["mtu"]))
    result["routes"] = [net for net in desired.get("routes", ()) if routes.ensure_route(ifname, net)]
    actual = backend.read(ifname).peers
    changes = plan(peers_from_json(desired["peers"]), actual)
    backend.apply(ifname, changes)
    result["added"] = [p.public_key for p in changes.upsert if p.public_key not in actual]
    result["updated"] = [p.public_key for p in changes.upsert if p.public_key in actual]
    result["removed"] = list(changes.remove)
    result["changed"] = bool(
        result["interface"] or result["address"] or result["up"] or result["routes"] or not changes.is_empty()
    )
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wgctl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=[b for b in BACKEND_NAMES if b != "memory"], default="auto")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="show an interface")
    show.add_argument("ifname")
    show.add_argument("--json", action="store_true", help="print JSON")
    apply = sub.add_parser("apply", help="converge an interface on a JSON file")
    apply.add_argument("ifname")
    apply.add_argument("--json", dest="file", required=True, type=Path, help="desired state (JSON)")
    delete = sub.add_parser("delete", help="delete an interface")
    delete.add_argument("ifname")
    sub.add_parser("genkey", help="print a new private key")
    sub.add_parser("pubkey", help="print the public key of the private key on stdin")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 on a WireGuardError, with the message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "genkey":
            print(keys.generate_private_key())
            return 0
        if args.command == "pubkey":
            print(keys.public_key(sys.stdin.read()))
            return 0
        backend = select_backend(args.backend)
        if args.command == "show":
            state = state_to_json(backend.read(args.ifname), now=time.time())
            if args.json:
                print(json.dumps(state, indent=2))
            else:
                print(
                    f"interface {state['name']}  public key {state['public_key']}  port {state['listen_port']}"
                )
                for p in state["peers"]:
                    age = "never" if p["handshake_age"] is None else f"{p['handshake_age']:.0f}s ago"
                    print(
                        f"  peer {p['public_key']}  {','.join(p['allowed_ips'])}  endpoint {p['endpoint']}  "
                        f"handshake {age}  rx {p['rx_bytes']} tx {p['tx_bytes']}"
                    )
        elif args.command == "apply":
            desired = json.loads(args.file.read_text())
            print(json.dumps(apply_file(backend, args.ifname, desired), indent=2))
        elif args.command == "delete":
            backend.delete_interface(args.ifname)
    except WireGuardError as exc:
        print(f"wgctl: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as exc:
        # A missing or malformed apply file: say which, rather than a traceback.
        print(f"wgctl: bad input: {exc!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
