"""`meshvpn-registrar`: run the control plane, and administer the running one through its local admin socket.

    meshvpn-registrar [--config FILE] run [--embedded-broker] [--broker-listen HOST:PORT] [--broker URL]
        [--http HOST:PORT] [--state-dir DIR] [--mesh NAME] [--network CIDR] [--heartbeat-interval S]
        [--heartbeat-ttl S] [--expiry S] [--tls-name NAME ...] [--no-tls] [--log-json]
    meshvpn-registrar tokens create [--reusable] [--ttl SECONDS] [--uses N] | tokens list | tokens revoke ID
    meshvpn-registrar nodes list | nodes remove NODE [--keep-key] | nodes revoked | nodes approve PUBLIC_KEY
    meshvpn-registrar credentials issue observer
    meshvpn-registrar mosquitto init [--dir DIR] [--owner USER] [--observer] [--force [--drop-node-accounts]]

Settings come from the TOML file, then MESHVPN_* variables, then flags (meshcontract.settings.load_settings).
The admin commands talk to the registrar running with the same state directory (STATE_DIR/admin.sock).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from meshcontract import logs
from meshcontract.errors import ContractError
from meshcontract.settings import load_settings
from registrar.admin_client import AdminClient
from registrar.errors import RegistrarError
from registrar.settings import RegistrarSettings

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  meshvpn-registrar run --embedded-broker                     # the control plane with its own broker (TLS)
  meshvpn-registrar tokens create --reusable --ttl 86400      # prints a token and the agent command using it
  meshvpn-registrar nodes remove laptop                       # cut a node off now; its key cannot rejoin
  meshvpn-registrar credentials issue observer                # a password for mosquitto_sub
  meshvpn-registrar mosquitto init --owner mosquitto          # once, before using Mosquitto as the broker
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshvpn-registrar",
        description="The meshvpn control plane (one mesh).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="TOML settings file (e.g. /etc/meshvpn/registrar.toml)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="the registrar's state directory (default /var/lib/meshvpn-registrar)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="serve the mesh (MQTT + HTTP API)")
    run.add_argument("--embedded-broker", action="store_true", default=None, help="run the amqtt broker in-process")
    run.add_argument("--broker-listen", help="embedded broker HOST:PORT (default 0.0.0.0:8883)")
    run.add_argument("--broker", help="external broker URL mqtts://HOST:PORT (Mosquitto)")
    run.add_argument("--http", help="HTTP API HOST:PORT (default 0.0.0.0:8443; '' disables)")
    run.add_argument("--mesh", help="mesh name")
    run.add_argument("--network", help="mesh CIDR, e.g. 100.96.0.0/16")
    run.add_argument("--heartbeat-interval", type=float, help="seconds between node heartbeats")
    run.add_argument("--heartbeat-ttl", type=float, help="silence after which a member is unreachable")
    run.add_argument("--expiry", type=float, help="unreachable this long (s): removed, its IP freed")
    run.add_argument("--tls-name", action="append", help="a name or address the TLS certificate must cover")
    run.add_argument("--no-tls", dest="tls", action="store_false", default=None,
                     help="plain TCP for the API and the embedded broker (lab only; logged loudly)")  # fmt: skip
    run.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line")

    tok = sub.add_parser("tokens", help="join tokens").add_subparsers(dest="tokens_command", required=True)
    create = tok.add_parser("create", parents=[common], help="create a join token and print it")
    create.add_argument("--reusable", action="store_true", help="usable by several nodes")
    create.add_argument("--ttl", type=float, help="seconds until it expires")
    create.add_argument("--uses", type=int, help="maximum number of nodes it admits (implies --reusable)")
    create.add_argument("--json", action="store_true", help="print the token's details as JSON")
    tok.add_parser("list", parents=[common], help="list join tokens (never their secrets)")
    revoke = tok.add_parser("revoke", parents=[common], help="delete a join token")
    revoke.add_argument("id")

    nodes = sub.add_parser("nodes", help="members").add_subparsers(dest="nodes_command", required=True)
    nodes.add_parser("list", parents=[common], help="every member")
    remove = nodes.add_parser("remove", parents=[common], help="remove a member and cut its session at once")
    remove.add_argument("node_id")
    remove.add_argument("--keep-key", action="store_true", help="let its key come back with a join token")
    nodes.add_parser("revoked", parents=[common], help="keys removed members may not enroll with")
    approve = nodes.add_parser("approve", parents=[common], help="let a revoked key enroll again")
    approve.add_argument("public_key")

    cred = sub.add_parser("credentials", help="broker accounts").add_subparsers(dest="cred_command", required=True)
    issue = cred.add_parser("issue", parents=[common], help="a new password for the observer account")
    issue.add_argument("username", choices=["observer"])

    mosq = sub.add_parser("mosquitto", help="Mosquitto as the broker").add_subparsers(
        dest="mosquitto_command", required=True
    )
    init = mosq.add_parser("init", parents=[common], help="prepare Mosquitto's accounts and TLS for this registrar")
    init.add_argument("--dir", default="/etc/mosquitto/meshvpn", help="where (default %(default)s)")
    init.add_argument("--owner", help="Mosquitto's user and group, owner of the files (Debian: mosquitto)")
    init.add_argument("--observer", action="store_true", help="also create the observer account (password printed)")
    init.add_argument("--force", action="store_true", help="replace an existing setup")
    init.add_argument(
        "--drop-node-accounts", action="store_true",
        help="with --force, also when nodes are enrolled: none of them can log in afterwards (docs/deploy.md)",
    )  # fmt: skip
    init.add_argument("--tls-name", action="append", help="a name or address the TLS certificate must cover")
    return p


def _settings(args: argparse.Namespace) -> RegistrarSettings:
    overrides = {
        "state_dir": getattr(args, "state_dir", None),
        "embedded_broker": getattr(args, "embedded_broker", None),
        "broker_listen": getattr(args, "broker_listen", None),
        "broker.url": getattr(args, "broker", None),
        "http_listen": getattr(args, "http", None),
        "mesh": getattr(args, "mesh", None),
        "network": getattr(args, "network", None),
        "heartbeat_interval_s": getattr(args, "heartbeat_interval", None),
        "heartbeat_ttl_s": getattr(args, "heartbeat_ttl", None),
        "expiry_s": getattr(args, "expiry", None),
        "tls_names": getattr(args, "tls_name", None),
        "tls": getattr(args, "tls", None),
        "log_json": getattr(args, "log_json", None),
    }
    return load_settings(RegistrarSettings, path=args.config, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `meshvpn-registrar`; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        logs.setup(level=settings.log_level, json_format=settings.log_json)
        if args.command == "run":
            from registrar.runner import run

            return run(settings)
        if args.command == "mosquitto":
            return _mosquitto(settings, args)
        return _admin(AdminClient(settings.admin_socket), args)
    except (ContractError, RegistrarError, ValueError) as exc:
        print(f"meshvpn-registrar: {exc}", file=sys.stderr)
        return 2


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if at else "never"


def _admin(admin: AdminClient, args: argparse.Namespace) -> int:
    if args.command == "tokens":
        if args.tokens_command == "create":
            body = {"reusable": args.reusable or args.uses is not None, "ttl_s": args.ttl, "max_uses": args.uses}
            created = admin.request("POST", "/v1/tokens", body)
            if args.json:
                print(json.dumps(created, indent=1))
            else:
                print(created["token"])
                print(f"# join a node: {created['join_command']}", file=sys.stderr)
            return 0
        if args.tokens_command == "list":
            print(f"{'ID':<14}{'REUSABLE':<10}{'USES':<10}EXPIRES")
            for t in admin.request("GET", "/v1/tokens"):
                uses = f"{t['uses']}/{t['max_uses'] if t['max_uses'] is not None else '-'}"
                print(f"{t['id']:<14}{'yes' if t['reusable'] else 'no':<10}{uses:<10}{_when(t['expires_at'])}")
            return 0
        admin.request("DELETE", f"/v1/tokens/{args.id}")
        return 0
    if args.command == "nodes":
        if args.nodes_command == "list":
            print(f"{'NODE':<14}{'NAME':<20}{'MESH IP':<16}{'STATE':<13}LAST SEEN")
            for n in admin.request("GET", "/v1/nodes"):
                print(f"{n['node_id']:<14}{n['name'][:19]:<20}{n['mesh_ip']:<16}{n['state']:<13}{_when(n['last_seen'])}")
            return 0
        if args.nodes_command == "remove":
            keep = "false" if args.keep_key else "true"
            admin.request("DELETE", f"/v1/nodes/{args.node_id}?revoke={keep}")
            print(f"removed {args.node_id}" + ("" if args.keep_key else "; its key is revoked (nodes approve KEY)"))
            return 0
        if args.nodes_command == "revoked":
            for r in admin.request("GET", "/v1/revoked"):
                print(f"{r['public_key']}  {r['node_id']}  revoked {_when(r['revoked_at'])}")
            return 0
        admin.request("POST", "/v1/revoked/approve", {"public_key": args.public_key})
        return 0
    answer = admin.request("POST", "/v1/accounts/observer")
    print(answer["password"])
    return 0


def _mosquitto(settings: RegistrarSettings, args: argparse.Namespace) -> int:
    from registrar.mosquitto_init import init

    done = init(
        settings, directory=Path(args.dir), owner=args.owner, observer=args.observer, force=args.force,
        drop_node_accounts=args.drop_node_accounts,
    )  # fmt: skip
    print(f"Mosquitto prepared in {done.directory}; start it with broker/mosquitto/mosquitto.conf "
          f"(meshvpn-broker mosquitto-config), then: meshvpn-registrar run --broker mqtts://127.0.0.1:8883")  # fmt: skip
    if done.observer_password is not None:
        print(f"observer password: {done.observer_password}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
