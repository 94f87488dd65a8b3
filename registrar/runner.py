"""`meshvpn-registrar run`: builds the running registrar from its settings and serves until stopped.

The composition root of the registrar (the one place that may import broker.embedded): the state directory and
its keys (registrar.pki), the broker (embedded, or Mosquitto whose accounts it manages through the dynamic
security plugin), the service, and the HTTP API on the network (TLS) and on the local admin socket.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from meshcontract import access
from meshcontract.messages import MeshSettings, RegistrarInfo
from meshcontract.stopping import StopSignals
from meshcontract.transport import BrokerSettings, connect_async, make_client, release
from registrar import engine, pki
from registrar.accounts import BrokerAccounts, DynsecAccounts, PasswordFileAccounts
from registrar.dynsec import DynsecAdmin
from registrar.errors import RegistrarError
from registrar.files import write_atomically
from registrar.liveness import LivenessPolicy
from registrar.settings import RegistrarSettings, split_listen
from registrar.store import SqliteStore

log = logging.getLogger(__name__)

REGISTRAR_PASSWORD_FILE = "broker.password"
ADMIN_PASSWORD_FILE = "broker-admin.password"


def server_names(settings: RegistrarSettings) -> list[str]:
    """Every name and address the TLS certificate covers: configured ones first, then this host's."""
    names = list(settings.tls_names)
    for listen in (settings.http_listen, settings.broker_listen if settings.embedded_broker else None):
        if listen:
            host, _ = split_listen(listen)
            if host not in ("0.0.0.0", "::"):
                names.append(host)
    if settings.public_url:
        names.append(urlsplit(settings.public_url).hostname or "")
    names += [socket.gethostname(), "localhost", "127.0.0.1"]
    return list(dict.fromkeys(n for n in names if n))


def public_host(settings: RegistrarSettings) -> str:
    """The name nodes use for this host when nothing more precise is configured."""
    if settings.public_url:
        return urlsplit(settings.public_url).hostname or socket.gethostname()
    return server_names(settings)[0]


def _http_url(settings: RegistrarSettings, port: int) -> str:
    if settings.public_url:
        return settings.public_url
    return f"{'https' if settings.tls else 'http'}://{public_host(settings)}:{port}"


def read_secret(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def admin_token(settings: RegistrarSettings) -> str:
    """The admin bearer token: configured, or STATE_DIR/admin_token (created on first use, 0600)."""
    if settings.admin_token:
        return settings.admin_token
    path = settings.state_dir / "admin_token"
    token = read_secret(path)
    if token is None:
        token = secrets.token_urlsafe(32)
        write_atomically(path, token + "\n")
        log.info("generated an admin token in %s", path)
    return token


def _config(settings: RegistrarSettings) -> engine.Config:
    return engine.Config(
        mesh=MeshSettings(
            mesh=settings.mesh,
            network=settings.network,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            heartbeat_ttl_s=settings.heartbeat_ttl_s,
            persistent_keepalive_s=settings.persistent_keepalive_s,
            mtu=settings.mtu,
        ),
        policy=LivenessPolicy(
            ttl_s=settings.heartbeat_ttl_s,
            expiry_s=settings.expiry_s,
            grace_s=settings.effective_grace_s,
            vouch_wait_s=settings.vouch_wait_s,
        ),
        require_token=settings.require_token,
    )


class _Parts:
    """What run() started, so that it can stop it in reverse order whatever failed half way."""

    def __init__(self) -> None:
        self.embedded = None
        self.admin_client = None
        self.servers: list = []


def _embedded_broker(settings: RegistrarSettings, keys: pki.RegistrarKeys, parts: _Parts):
    from broker.embedded import EmbeddedBroker
    from broker.settings import BrokerServerSettings

    host, port = split_listen(settings.broker_listen)
    password_file = settings.effective_password_file
    # The registrar's own broker password: fresh each start, only ever in the hashed file and our memory.
    own = secrets.token_urlsafe(24)
    accounts = PasswordFileAccounts(password_file)
    accounts.set_service_account(access.REGISTRAR_USER, own)
    tls = {"certfile": keys.files.server_cert, "keyfile": keys.files.server_key} if settings.tls else {}
    embedded = EmbeddedBroker(
        BrokerServerSettings(host=host, port=port, password_file=password_file, mesh=settings.mesh, **tls)
    )
    embedded.start()
    parts.embedded = embedded
    accounts = PasswordFileAccounts(password_file, disconnect=embedded.disconnect)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    scheme = "mqtts" if settings.tls else "mqtt"
    broker = BrokerSettings(
        url=f"{scheme}://{local}:{embedded.port}",
        username=access.REGISTRAR_USER,
        password=own,
        keepalive_s=settings.broker.keepalive_s,
        ca_file=str(keys.files.ca_cert) if settings.tls else None,
        verify_hostname=False,
    )
    public = settings.public_broker_url or f"{scheme}://{public_host(settings)}:{embedded.port}"
    return broker, accounts, public


def _external_broker(settings: RegistrarSettings, keys: pki.RegistrarKeys, parts: _Parts):
    broker = settings.broker
    password = broker.password or read_secret(settings.state_dir / REGISTRAR_PASSWORD_FILE)
    if password is None:
        raise RegistrarError(
            f"no broker password for the registrar: set broker.password, or run `meshvpn-registrar mosquitto init` "
            f"(it writes {settings.state_dir / REGISTRAR_PASSWORD_FILE})"
        )
    tls = broker.host_port()[2]
    broker = broker.model_copy(
        update={
            "password": password,
            # Mosquitto serves the registrar's own certificate (mosquitto init copies it there).
            "ca_file": broker.ca_file or (str(keys.files.ca_cert) if tls else None),
            "verify_hostname": broker.verify_hostname if broker.ca_file else False,
        }
    )
    accounts: BrokerAccounts | None = None
    admin_password = settings.broker_admin_password or read_secret(settings.state_dir / ADMIN_PASSWORD_FILE)
    mode = settings.broker_accounts
    if mode == "auto":
        mode = "dynsec" if admin_password is not None else "none"
    if mode == "password_file":
        # A standalone embedded broker (meshvpn-broker) on this host reading the same file: it drops the session
        # of an account that disappears from it.
        accounts = PasswordFileAccounts(settings.effective_password_file)
    elif mode == "dynsec":
        if admin_password is None:
            raise RegistrarError(
                f"broker_accounts = dynsec needs the broker admin password (broker_admin_password, or "
                f"{settings.state_dir / ADMIN_PASSWORD_FILE} from `meshvpn-registrar mosquitto init`)"
            )
        admin_settings = broker.model_copy(update={"username": access.BROKER_ADMIN_USER, "password": admin_password})
        client = make_client(admin_settings, client_id=access.BROKER_ADMIN_USER)
        admin = DynsecAdmin(client)
        client.reconnect_delay_set(min_delay=0.25, max_delay=2.0)
        connect_async(client, admin_settings)
        parts.admin_client = client
        accounts = DynsecAccounts(admin, mesh=settings.mesh)
    else:
        log.warning(
            "node broker accounts are not managed (no broker admin password: broker_admin_password or %s): "
            "enrolled nodes cannot log in unless their accounts are provisioned by hand",
            settings.state_dir / ADMIN_PASSWORD_FILE,
        )
    return broker, accounts, settings.public_broker_url or settings.broker.url


def run(settings: RegistrarSettings, *, stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set): broker (if embedded), MQTT service, HTTP API."""
    from registrar.api import create_app
    from registrar.httpserver import HttpServer
    from registrar.service import RegistrarService

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    if not settings.tls:
        log.warning(
            "TLS IS OFF (tls = false): the HTTP API and the embedded broker speak plain TCP; join tokens and node "
            "passwords cross the network readable by anyone on the path. Use this only in a lab."
        )
    keys = pki.load_or_create(settings.state_dir, mesh=settings.mesh, server_names=server_names(settings))
    stop = stop or threading.Event()
    store = SqliteStore(settings.db_path)
    parts = _Parts()
    service = None
    try:
        if settings.embedded_broker:
            broker, accounts, broker_url = _embedded_broker(settings, keys, parts)
        else:
            broker, accounts, broker_url = _external_broker(settings, keys, parts)
        service = RegistrarService(
            config=_config(settings),
            store=store,
            broker=broker,
            network=settings.network,
            quarantine_s=settings.quarantine_s,
            signer=keys.signer,
            accounts=accounts,
            publish_window_s=settings.publish_window_s,
            publish_max_delay_s=settings.publish_max_delay_s,
            will_hold_s=settings.will_hold_s,
            offline_doubt_s=settings.offline_doubt_s,
            tick_interval_s=settings.effective_tick_interval_s,
        )
        service.start()
        info = RegistrarInfo(mesh=settings.mesh, ca_pem=keys.ca_pem.decode(), broker_url=broker_url)
        token = admin_token(settings)
        http = None
        http_port = lambda: http.port if http is not None else split_listen(settings.http_listen)[1]  # noqa: E731
        if settings.http_listen:
            join = lambda: _join_command(settings, _http_url(settings, http_port()))  # noqa: E731
        else:
            join = lambda: _join_command(settings, settings.public_url or "URL")  # noqa: E731
        # The admin socket first: once the public API answers (/healthz ready), the admin commands work too.
        local_app = create_app(service, admin_token=token, info=info, pin=keys.pin, local_admin=True, join_command=join)
        local = HttpServer(local_app, uds=settings.admin_socket)
        parts.servers.append(local)
        local.start()
        if settings.http_listen:
            host, port = split_listen(settings.http_listen)
            tls = {"certfile": keys.files.server_cert, "keyfile": keys.files.server_key} if settings.tls else {}
            app = create_app(service, admin_token=token, info=info, pin=keys.pin, join_command=join)
            http = HttpServer(app, host=host, port=port, **tls)
            parts.servers.append(http)
            http.start()
            log.info("HTTP API on %s://%s:%d (OpenAPI at /docs)", "https" if settings.tls else "http", host, http.port)
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
        for server in reversed(parts.servers):
            server.stop()
        if service is not None:
            service.stop()
        if parts.admin_client is not None:
            release(parts.admin_client)
        if parts.embedded is not None:
            parts.embedded.stop()
        store.close()
    return 0


def _join_command(settings: RegistrarSettings, url: str) -> str:
    mesh = f" --mesh {settings.mesh}" if settings.mesh != "mesh" else ""
    return f"meshvpn-agent --registrar {url}{mesh} --join-token TOKEN"
