"""`meshvpn-broker`: run the embedded broker, manage its (Mosquitto-format) password file, print a Mosquitto config.

    meshvpn-broker [--config FILE] [--host H] [--port P] [--password-file F] [--allow-anonymous] [--mesh M]
                   [--certfile F --keyfile F] [--log-json]
    meshvpn-broker passwd add USER --password-file F [--password PW]   # prompts when --password is not given
    meshvpn-broker passwd remove USER --password-file F
    meshvpn-broker mosquitto-config [--dynsec-file F] [--plugin SO] [--tls-listen HOST:PORT] [--certfile F]
                                    [--keyfile F] [--listen HOST:PORT] [--run-as USER] [--log-file F]

The composition root of the broker service: settings are loaded here once (file, MESHVPN_* env, flags).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path

from broker.errors import BrokerError, PasswordFileError
from broker.mosquitto_config import (
    DEFAULT_DYNSEC_FILE,
    DEFAULT_PLUGIN,
    DynsecAuth,
    Listener,
    MosquittoConfig,
    MosquittoLogging,
    TlsFiles,
    render,
)
from broker.settings import BrokerServerSettings
from meshcontract import access, logs
from meshcontract.errors import ContractError
from meshcontract.settings import load_settings
from meshcontract.stopping import StopSignals

log = logging.getLogger(__name__)


def _file_options(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument("--config", default=default, help="TOML settings file (BrokerServerSettings fields)")
    parser.add_argument("--password-file", default=default,
                        help="Mosquitto-format password file (enables authentication + ACL)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshvpn-broker", description="meshvpn's embedded MQTT broker (amqtt)")
    _file_options(parser, default=None)
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 1883)")
    parser.add_argument("--allow-anonymous", action="store_true", default=None, help="let clients in without a username")
    parser.add_argument("--mesh", help="the mesh whose topics accounts may use (default: any)")
    parser.add_argument("--certfile", help="TLS certificate (with --keyfile: the listener speaks TLS)")
    parser.add_argument("--keyfile", help="TLS private key")
    parser.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the broker (the default)")
    passwd = sub.add_parser("passwd", help="manage the password file")
    psub = passwd.add_subparsers(dest="passwd_command", required=True)
    add = psub.add_parser("add", help="add a user or change its password")
    add.add_argument("user")
    add.add_argument("--password", help="the password (prompted for when omitted)")
    remove = psub.add_parser("remove", help="remove a user")
    remove.add_argument("user")
    # Also accepted after the subcommand ("passwd add n1 --password-file F"); SUPPRESS keeps an absent option
    # from overwriting one given before the subcommand.
    for subcommand in (add, remove):
        _file_options(subcommand, default=argparse.SUPPRESS)
    conf = sub.add_parser("mosquitto-config", help="print a Mosquitto config for meshvpn (broker/mosquitto_config.py)")
    conf.add_argument("--dynsec-file", default=DEFAULT_DYNSEC_FILE,
                      help="the dynamic security plugin's JSON file (default %(default)s)")
    conf.add_argument("--plugin", default=DEFAULT_PLUGIN, help="the plugin's path (default %(default)s)")
    conf.add_argument("--tls-listen", default="0.0.0.0:8883",
                      help="TLS listener HOST:PORT for nodes (default %(default)s; '' for none)")
    conf.add_argument("--certfile", default=TlsFiles().certfile, help="server certificate (default %(default)s)")
    conf.add_argument("--keyfile", default=TlsFiles().keyfile, help="server key (default %(default)s)")
    conf.add_argument("--listen", default="127.0.0.1:1883",
                      help="plain TCP listener HOST:PORT (default %(default)s, loopback only; '' for none)")
    conf.add_argument("--run-as", help="Mosquitto's `user` (default: Mosquitto's own)")
    conf.add_argument("--log-file", help="log to this file (default: Mosquitto's destination)")
    return parser


def _listener(text: str, tls: TlsFiles | None) -> Listener:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return Listener(host.strip("[]"), int(port), tls)


def _mosquitto_config(args: argparse.Namespace) -> int:
    try:
        listeners = []
        if args.tls_listen:
            listeners.append(_listener(args.tls_listen, TlsFiles(args.certfile, args.keyfile)))
        if args.listen:
            listeners.append(_listener(args.listen, None))
        config = MosquittoConfig(
            listeners=tuple(listeners),
            auth=DynsecAuth(config_file=args.dynsec_file, plugin=args.plugin),
            run_as=args.run_as,
            logging=MosquittoLogging(file=args.log_file),
        )
        sys.stdout.write(render(config))
    except ValueError as exc:
        print(f"meshvpn-broker mosquitto-config: {exc}", file=sys.stderr)
        return 2
    return 0


def write_password_file(path: Path, entries: dict[str, str]) -> None:
    """Replace the password file atomically (0600), so a broker re-reading it never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(access.render_password_file(entries))
        os.replace(tmp, path)
    except OSError as exc:
        raise PasswordFileError(f"cannot write password file {path}: {exc}") from exc


def read_password_file(path: Path) -> dict[str, str]:
    """username -> hash; an absent file is empty."""
    try:
        return access.parse_password_file(path.read_text())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PasswordFileError(f"cannot read password file {path}: {exc}") from exc


def _passwd(args: argparse.Namespace, settings: BrokerServerSettings) -> int:
    if settings.password_file is None:
        print("meshvpn-broker passwd: --password-file (or password_file in --config) is required", file=sys.stderr)
        return 2
    path = settings.password_file
    user = args.user
    if args.passwd_command == "add":
        if access.role_of(user) is None:
            print(f"invalid username {user!r}: must be 'registrar', 'observer' or a node id "
                  "(lowercase letters, digits, - and _)", file=sys.stderr)
            return 2
        password = args.password
        if password is None and not sys.stdin.isatty():
            # Scripts pipe it in (getpass would look for a terminal first).
            password = sys.stdin.readline().rstrip("\n")
        elif password is None:
            password = getpass.getpass(f"password for {user}: ")
            if getpass.getpass("again: ") != password:
                print("passwords differ", file=sys.stderr)
                return 1
        if not password:
            print("a password must not be empty", file=sys.stderr)
            return 2
        entries = read_password_file(path)
        entries[user] = access.hash_password(password)
        write_password_file(path, entries)
        print(f"{user} added to {path}", file=sys.stderr)
        return 0
    entries = read_password_file(path)
    if entries.pop(user, None) is None:
        print(f"{user} is not in {path}", file=sys.stderr)
        return 1
    write_password_file(path, entries)
    print(f"{user} removed from {path}", file=sys.stderr)
    return 0


def _run(settings: BrokerServerSettings) -> int:
    # Imported here: amqtt takes about a second to import, which `passwd` does not need.
    from broker.embedded import EmbeddedBroker

    signals = StopSignals().install()
    broker = EmbeddedBroker(settings)
    broker.start()
    log.info("broker ready on %s", broker.url)
    try:
        signals.wait()
    finally:
        broker.stop()
    log.info("broker stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `meshvpn-broker` and `python -m broker`; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "mosquitto-config":
        return _mosquitto_config(args)
    try:
        settings = load_settings(
            BrokerServerSettings,
            path=args.config,
            overrides={
                "host": args.host,
                "port": args.port,
                "password_file": args.password_file,
                "allow_anonymous": args.allow_anonymous,
                "mesh": getattr(args, "mesh", None),
                "certfile": getattr(args, "certfile", None),
                "keyfile": getattr(args, "keyfile", None),
                "log_json": args.log_json,
            },
        )
    except ContractError as exc:
        print(f"meshvpn-broker: {exc}", file=sys.stderr)
        return 2
    logs.setup(level=settings.log_level, json_format=settings.log_json)
    try:
        if args.command == "passwd":
            return _passwd(args, settings)
        return _run(settings)
    except BrokerError as exc:
        log.error("%s", exc)
        return 1
