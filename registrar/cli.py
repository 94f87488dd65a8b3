"""`meshvpn-registrar`: the composition root of the registrar (it may import broker.embedded).

    meshvpn-registrar [--config FILE] run [--embedded-broker] [--broker-listen HOST:PORT] [--broker URL]
        [--http HOST:PORT] [--state-dir DIR] [--mesh NAME] [--network CIDR] [--heartbeat-interval S]
        [--heartbeat-ttl S] [--log-json]
    meshvpn-registrar tokens create [--reusable] [--ttl SECONDS] [--uses N] | tokens list | tokens revoke ID
    meshvpn-registrar credentials issue USERNAME

Settings come from the TOML file, then MESHVPN_* variables, then flags (meshcontract.settings.load_settings).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import threading
import time

from meshcontract import access, logs
from meshcontract.errors import ContractError
from meshcontract.messages import MeshSettings
from meshcontract.settings import load_settings
from meshcontract.stopping import StopSignals
from meshcontract.transport import BrokerSettings
from registrar import engine, tokens
from registrar.credentials import PasswordFileCredentials, command_reload, write_atomically
from registrar.errors import RegistrarError
from registrar.membership import LivenessPolicy
from registrar.settings import RegistrarSettings, split_listen
from registrar.store import SqliteStore

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshvpn-registrar", description="The meshvpn control plane (one mesh).")
    p.add_argument("--config", help="TOML settings file")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the mesh (MQTT + HTTP API)")
    run.add_argument(
        "--embedded-broker", action="store_true", default=None, help="run the amqtt broker in-process"
    )
    run.add_argument("--broker-listen", help="embedded broker HOST:PORT")
    run.add_argument("--broker", help="broker URL mqtt://HOST:PORT (external broker)")
    run.add_argument("--http", help="HTTP API HOST:PORT ('' disables)")
    run.add_argument("--state-dir", help="directory for registrar.db, passwords, admin_token")
    run.add_argument("--mesh", help="mesh name")
    run.add_argument("--network", help="mesh CIDR, e.g. 100.96.0.0/16")
    run.add_argument("--heartbeat-interval", type=float, help="seconds between node heartbeats")
    run.add_argument("--heartbeat-ttl", type=float, help="silence after which a member is unreachable")
    run.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line")

    tok = sub.add_parser("tokens", help="manage join tokens").add_subparsers(
        dest="tokens_command", required=True
    )
    create = tok.add_parser("create", help="create a join token and print it")
    create.add_argument("--reusable", action="store_true", help="usable by several nodes")
    create.add_argument("--ttl", type=float, help="seconds until it expires")
    create.add_argument("--uses", type=int, help="maximum number of nodes it admits (implies --reusable)")
    create.add_argument("--state-dir")
    lst = tok.add_parser("list", help="list join tokens (never their secrets)")
    lst.add_argument("--state-dir")
    revoke = tok.add_parser("revoke", help="delete a join token")
    revoke.add_argument("id")
    revoke.add_argument("--state-dir")

    cred = sub.add_parser("credentials", help="broker credentials").add_subparsers(
        dest="cred_command", required=True
    )
    issue = cred.add_parser(
        "issue", help="print a new broker password for USERNAME and write it to the password file"
    )
    issue.add_argument("username")
    issue.add_argument("--state-dir")
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
        "log_json": getattr(args, "log_json", None),
    }
    settings = load_settings(RegistrarSettings, path=args.config, overrides=overrides)
    if settings.broker.username is None:
        settings.broker.username = access.REGISTRAR_USER
    return settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of `meshvpn-registrar`; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        logs.setup(level=settings.log_level, json_format=settings.log_json)
        if args.command == "run":
            return run(settings)
        if args.command == "tokens":
            return _tokens(settings, args)
        return _credentials(settings, args)
    except (ContractError, RegistrarError, ValueError) as exc:
        print(f"meshvpn-registrar: {exc}", file=sys.stderr)
        return 2


def _tokens(settings: RegistrarSettings, args: argparse.Namespace) -> int:
    store = SqliteStore(settings.db_path)
    try:
        if args.tokens_command == "create":
            secret = tokens.new_secret()
            table = {t.id: t for t in store.load_tokens()}
            reusable = args.reusable or args.uses is not None
            _, token = tokens.create(
                table, secret=secret, now=time.time(), ttl_s=args.ttl, reusable=reusable, max_uses=args.uses
            )
            store.add_token(token)
            print(secret)
            return 0
        if args.tokens_command == "list":
            print(f"{'ID':<14}{'REUSABLE':<10}{'USES':<10}EXPIRES")
            for t in sorted(store.load_tokens(), key=lambda t: t.created_at):
                uses = f"{t.uses}/{t.max_uses if t.max_uses is not None else '-'}"
                expires = (
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t.expires_at))
                    if t.expires_at
                    else "never"
                )
                print(f"{t.id:<14}{'yes' if t.reusable else 'no':<10}{uses:<10}{expires}")
            return 0
        if not store.delete_token(args.id):
            print(f"meshvpn-registrar: no token {args.id}", file=sys.stderr)
            return 1
        return 0
    finally:
        store.close()


def _credentials(settings: RegistrarSettings, args: argparse.Namespace) -> int:
    if access.role_of(args.username) is None:
        print(f"meshvpn-registrar: {args.username!r} is not a valid broker username", file=sys.stderr)
        return 2
    reload = command_reload(settings.broker_reload_command) if settings.broker_reload_command else None
    print(PasswordFileCredentials(settings.effective_password_file, reload=reload).issue(args.username))
    return 0


def _admin_token(settings: RegistrarSettings) -> str:
    if settings.admin_token:
        return settings.admin_token
    path = settings.state_dir / "admin_token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        write_atomically(path, token + "\n")
        log.info("generated an admin token in %s", path)
        return token


def run(settings: RegistrarSettings, *, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set): broker (if embedded), MQTT service, HTTP API."""
    from registrar.api import HttpServer, create_app
    from registrar.service import RegistrarService

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    stop = stop or threading.Event()
    store = SqliteStore(settings.db_path)
    password_file = settings.effective_password_file
    reload = command_reload(settings.broker_reload_command) if settings.broker_reload_command else None
    credentials = PasswordFileCredentials(password_file, reload=reload)
    broker_settings = settings.broker
    embedded = None
    service: RegistrarService | None = None

    def verify(username: str, token: str) -> bool:
        # A join token opens the broker only for a node id that has no credentials yet: otherwise a token
        # holder could log in as an existing member, take over its session and speak for it.
        return service is not None and service.token_valid(token) and not credentials.has(username)

    if settings.embedded_broker:
        from broker.embedded import EmbeddedBroker
        from broker.settings import BrokerServerSettings

        host, port = split_listen(settings.broker_listen)
        # The registrar's own broker password: fresh each start, only ever in the hashed file and our memory.
        own = secrets.token_urlsafe(24)
        PasswordFileCredentials(password_file).set(access.REGISTRAR_USER, own)
        embedded = EmbeddedBroker(
            BrokerServerSettings(host=host, port=port, password_file=password_file), token_verifier=verify
        )
        embedded.start()
        broker_settings = BrokerSettings(
            url=f"mqtt://{host}:{embedded.port}",
            username=access.REGISTRAR_USER,
            password=own,
            keepalive_s=settings.broker.keepalive_s,
        )

    config = engine.Config(
        mesh=MeshSettings(
            mesh=settings.mesh,
            network=settings.network,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            heartbeat_ttl_s=settings.heartbeat_ttl_s,
            persistent_keepalive_s=settings.persistent_keepalive_s,
            mtu=settings.mtu,
        ),
        policy=LivenessPolicy(
            ttl_s=settings.heartbeat_ttl_s, expiry_s=settings.expiry_s, grace_s=settings.effective_grace_s
        ),
        require_token=settings.require_token,
    )
    service = RegistrarService(
        config=config,
        store=store,
        broker=broker_settings,
        network=settings.network,
        quarantine_s=settings.quarantine_s,
        credentials=credentials if settings.issue_credentials else None,
        publish_window_s=settings.publish_window_s,
        publish_max_delay_s=settings.publish_max_delay_s,
        will_hold_s=settings.will_hold_s,
        offline_doubt_s=settings.offline_doubt_s,
        tick_interval_s=settings.effective_tick_interval_s,
    )
    http = None
    try:
        service.start()
        if settings.http_listen:
            host, port = split_listen(settings.http_listen)
            http = HttpServer(create_app(service, admin_token=_admin_token(settings)), host=host, port=port)
            http.start()
            log.info("HTTP API on http://%s:%d (OpenAPI at /docs)", host, http.port)
        signals = StopSignals(stop)
        if threading.current_thread() is threading.main_thread():
            signals.install()
        # A signal ends the short wait at once (StopSignals' wakeup socket): a stop during start-up is not delayed.
        while not service.wait_ready(0) and not signals.wait(0.05):
            pass
        if not signals.requested:
            log.info("registrar ready", extra={"revision": service.state.membership.revision})
        signals.wait()
        log.info("stopping")
    finally:
        if http is not None:
            http.stop()
        service.stop()
        if embedded is not None:
            embedded.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
