"""Mosquitto's configuration for a meshvpn broker, rendered from one settings object. Pure: no I/O here.

Every Mosquitto that meshvpn runs gets its config from `render`: the shipped broker/mosquitto/mosquitto.conf is
`render(MosquittoConfig())` (tests/unit/test_broker_mosquitto_config.py checks the file equals it), meshlab
and the test fixtures render their own listeners, paths and logging, and the container image renders its paths
with `meshvpn-broker mosquitto-config`. A setting the benchmarks or a bug taught us is needed therefore reaches
every one of them at once.

Access is Mosquitto's dynamic security plugin: the registrar creates and deletes node accounts at run time
(registrar.accounts), with the rights of meshcontract.access.GRANTS; the plugin's JSON file is written once by
`meshvpn-registrar mosquitto init`. The other kind, anonymous access, is for quick local tests only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent / "mosquitto"
SHIPPED_CONFIG = PACKAGE_DIR / "mosquitto.conf"

CONFIG_DIR = "/etc/mosquitto/meshvpn"
DEFAULT_DYNSEC_FILE = f"{CONFIG_DIR}/dynamic-security.json"
DEFAULT_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
ALL_LOG_TYPES = ("error", "warning", "notice", "information")
# Largest MQTT packet accepted. Membership snapshots are the largest messages (a few hundred bytes per member);
# this admits ~10,000 members uncompressed and refuses a node's attempt to park megabytes on a retained topic.
DEFAULT_MAX_PACKET = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The server certificate and key a TLS listener presents (the registrar's, issued by its mesh CA)."""

    certfile: str = f"{CONFIG_DIR}/server.pem"
    keyfile: str = f"{CONFIG_DIR}/server.key"


@dataclass(frozen=True, slots=True)
class Listener:
    """One listener; `tls` None means plain TCP (loopback and the lab only: say so where you use it)."""

    host: str
    port: int
    tls: TlsFiles | None = None


@dataclass(frozen=True, slots=True)
class DynsecAuth:
    """Accounts and rights from the dynamic security plugin's JSON file (managed by the registrar at run time)."""

    config_file: str = DEFAULT_DYNSEC_FILE
    plugin: str = DEFAULT_PLUGIN


@dataclass(frozen=True, slots=True)
class AnonymousAccess:
    """No authentication and no ACL: anyone may connect and do anything. Quick local tests only."""


Auth = DynsecAuth | AnonymousAccess


@dataclass(frozen=True, slots=True)
class MosquittoLogging:
    """Where Mosquitto logs. file=None leaves the destination to Mosquitto (Debian's main config sets one)."""

    file: str | None = None
    types: tuple[str, ...] = ()  # empty: Mosquitto's default set
    timestamp_format: str | None = None
    connection_messages: bool | None = None  # None: Mosquitto's default (on)


def _default_listeners() -> tuple[Listener, ...]:
    # Nodes connect with TLS; plain TCP only on loopback, for tools on the broker host itself.
    return (Listener("0.0.0.0", 8883, TlsFiles()), Listener("127.0.0.1", 1883))


@dataclass(frozen=True, slots=True)
class MosquittoConfig:
    """What differs between the Mosquittos meshvpn runs; everything else `render` writes is always required."""

    listeners: tuple[Listener, ...] = field(default_factory=_default_listeners)
    auth: Auth = field(default_factory=DynsecAuth)
    # `user`: None keeps Mosquitto's default (started as root, it switches to the `mosquitto` user). The lab and
    # the tests keep root: the files they point at are root-owned 0600 or under a root-only temporary directory.
    run_as: str | None = None
    # See the comment `render` writes above these.
    max_queued_messages: int = 1000
    max_queued_bytes: int = 64 * 1024 * 1024
    max_packet_size: int = DEFAULT_MAX_PACKET
    logging: MosquittoLogging = field(default_factory=MosquittoLogging)


HEADER = """\
# Mosquitto configuration for a meshvpn broker (Mosquitto 2.0.x).
#
# Install: `compose/install.sh --mosquitto` copies this file to /etc/mosquitto/conf.d/meshvpn.conf and runs
# `meshvpn-registrar mosquitto init`, which writes /etc/mosquitto/meshvpn/ (dynamic-security.json with the
# registrar's accounts, the registrar's TLS certificate and key). Nodes then enroll with a join token: the
# registrar creates their accounts at run time. See docs/broker.md.
# Rendered by broker/mosquitto_config.py, which meshlab, the test fixtures and the container image use too:
# change the settings there (`meshvpn-broker mosquitto-config --help` renders them with other paths)."""


def _check(name: str, value: str) -> str:
    # One option per line: a newline in a path would smuggle in an option of its own.
    if not value or any(c in value for c in "\r\n"):
        raise ValueError(f"{name} must be a non-empty single line, got {value!r}")
    return value


def _listeners(config: MosquittoConfig) -> list[str]:
    if not config.listeners:
        raise ValueError("a broker needs at least one listener")
    lines = [
        "# One set of auth settings for every listener: 2.0.11 otherwise scopes auth settings per listener and",
        "# a listener declared before them would silently run without authentication.",
        "per_listener_settings false",
    ]
    for listener in config.listeners:
        if not 0 < listener.port < 65536:
            raise ValueError(f"listener port {listener.port} is not a TCP port")
        lines += ["", f"listener {listener.port} {_check('listener host', listener.host)}"]
        if listener.tls is not None:
            lines += [
                f"certfile {_check('certfile', listener.tls.certfile)}",
                f"keyfile {_check('keyfile', listener.tls.keyfile)}",
                "tls_version tlsv1.2",
            ]
    return lines


def _auth(auth: Auth) -> list[str]:
    if isinstance(auth, AnonymousAccess):
        return [
            "# Open broker: no authentication, no ACL (quick local tests only).",
            "allow_anonymous true",
            "",
            # 2.0.11 refuses every client without a username when this is on, whatever allow_anonymous says.
            "use_username_as_clientid false",
        ]
    return [
        "allow_anonymous false",
        "# Accounts and their rights (meshcontract.access.GRANTS) live in the plugin's file; the registrar adds a",
        "# node's account when it enrolls and deletes it (dropping its session) when it is removed.",
        f"plugin {_check('plugin', auth.plugin)}",
        f"plugin_opt_config_file {_check('config_file', auth.config_file)}",
        "",
        "# A node's broker username is its node id and its rights are written against it. Forcing the client id to",
        "# the username means one live session per account: a second connection with the same credentials takes",
        "# over the first instead of running beside it under another client id.",
        "use_username_as_clientid true",
    ]


def _sessions(config: MosquittoConfig) -> list[str]:
    if config.max_packet_size < 1024:
        raise ValueError("max_packet_size must be at least 1024 bytes")
    if config.max_queued_messages < 1 or config.max_queued_bytes < 1:
        # 0 means unlimited to Mosquitto, and with it 2.0.11 drops a client that publishes a denied QoS 1 message.
        raise ValueError("max_queued_messages and max_queued_bytes must be positive")
    return [
        "# Registration is small request/response traffic: without this Nagle + delayed ACK add ~40-80 ms per hop.",
        "set_tcp_nodelay true",
        "",
        "# No persistence: every piece of mesh state that must survive is owned by the registrar (SQLite) and",
        "# republished retained when it starts; nodes republish their own retained status on reconnect. A broker",
        "# restart therefore loses nothing that is not restored within one reconnect, and nothing stale is replayed.",
        "persistence false",
        "",
        "# A node receives one membership delta per batch of changes (and a snapshot when it resyncs), so its queue",
        "# holds few messages; these bound what a stalled client can make the broker keep for it. (Not 0 =",
        "# unlimited: with 0, 2.0.11 drops a client that publishes a denied QoS 1 message.)",
        f"max_queued_messages {config.max_queued_messages}",
        f"max_queued_bytes {config.max_queued_bytes}",
        "",
        "# Refuse packets larger than the largest membership snapshot we expect (see DEFAULT_MAX_PACKET).",
        f"max_packet_size {config.max_packet_size}",
    ]


def _process(config: MosquittoConfig) -> list[str]:
    lines: list[str] = []
    if config.run_as is not None:
        lines += ["# Keep this user instead of Mosquitto's own: the files above are readable by it alone.",
                  f"user {_check('run_as', config.run_as)}"]
    log = config.logging
    if log.file is not None:
        # A file, not stdout: Mosquitto flushes its file log per line but block-buffers a piped stdout.
        lines.append(f"log_dest file {_check('logging.file', log.file)}")
    lines += [f"log_type {_check('logging.types', kind)}" for kind in log.types]
    if log.timestamp_format is not None:
        lines.append(f"log_timestamp_format {_check('logging.timestamp_format', log.timestamp_format)}")
    if log.connection_messages is not None:
        lines.append(f"connection_messages {'true' if log.connection_messages else 'false'}")
    return lines


def render(config: MosquittoConfig) -> str:
    """The text of mosquitto.conf for `config`; ValueError for a value Mosquitto would misread."""
    sections = [HEADER.splitlines(), _listeners(config), _auth(config.auth), _sessions(config), _process(config)]
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"
