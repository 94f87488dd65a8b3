"""Mosquitto's configuration for a meshvpn broker, rendered from one settings object. Pure: no I/O here.

Every Mosquitto that meshvpn runs gets its config from `render`: the shipped broker/mosquitto/mosquitto.conf is
`render(MosquittoConfig())` (tests/unit/test_broker_mosquitto_config.py checks the file equals it), meshlab
and the test fixtures render their own listener, paths and logging, and the container image renders its paths
with `meshvpn-broker mosquitto-config`. A setting the benchmarks or a bug taught us is needed therefore reaches
every one of them at once.

The access part is a choice of one `Auth` kind. Adding one (Mosquitto's dynamic security plugin, say) means a
new dataclass and one more branch in `_auth`; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Where the packaged files live: the ACL is a file of its own, checked against meshcontract.access by
# tests/unit/test_access.py, and referenced (not copied) by the configs rendered here.
PACKAGE_DIR = Path(__file__).resolve().parent / "mosquitto"
ACL_FILE = PACKAGE_DIR / "acl.conf"
SHIPPED_CONFIG = PACKAGE_DIR / "mosquitto.conf"

DEFAULT_PASSWORD_FILE = "/etc/mosquitto/meshvpn/passwords"
DEFAULT_ACL_FILE = "/etc/mosquitto/meshvpn/acl.conf"
ALL_LOG_TYPES = ("error", "warning", "notice", "information")


@dataclass(frozen=True, slots=True)
class PasswordFileAuth:
    """Users from a Mosquitto password file; their rights from an ACL file (None: no ACL, for broker tests)."""

    password_file: str = DEFAULT_PASSWORD_FILE
    acl_file: str | None = DEFAULT_ACL_FILE


@dataclass(frozen=True, slots=True)
class AnonymousAccess:
    """No authentication and no ACL: anyone may connect and do anything. Quick local tests only."""


Auth = PasswordFileAuth | AnonymousAccess


@dataclass(frozen=True, slots=True)
class MosquittoLogging:
    """Where Mosquitto logs. file=None leaves the destination to Mosquitto (Debian's main config sets one)."""

    file: str | None = None
    types: tuple[str, ...] = ()  # empty: Mosquitto's default set
    timestamp_format: str | None = None
    connection_messages: bool | None = None  # None: Mosquitto's default (on)


@dataclass(frozen=True, slots=True)
class MosquittoConfig:
    """What differs between the Mosquittos meshvpn runs; everything else `render` writes is always required."""

    listen_host: str = "0.0.0.0"
    listen_port: int = 1883
    auth: Auth = field(default_factory=PasswordFileAuth)
    # `user`: None keeps Mosquitto's default (started as root, it switches to the `mosquitto` user). The lab and
    # the tests keep root: the files they point at are root-owned 0600 or under a root-only temporary directory.
    run_as: str | None = None
    # See the comment `render` writes above these two.
    max_queued_messages: int = 100000
    max_queued_bytes: int = 64 * 1024 * 1024
    logging: MosquittoLogging = field(default_factory=MosquittoLogging)


HEADER = """\
# Mosquitto configuration for a meshvpn broker (Mosquitto 2.0.x).
#
# Install: copy this file to /etc/mosquitto/conf.d/meshvpn.conf and acl.conf next to the password file, then
# create users with `mosquitto_passwd` or `meshvpn-broker passwd add USER` (same file format). See docs/broker.md.
# Rendered by broker/mosquitto_config.py, which meshlab, the test fixtures and the container image use too:
# change the settings there (`meshvpn-broker mosquitto-config --help` renders them with other paths)."""


def _check(name: str, value: str) -> str:
    # One option per line: a newline in a path would smuggle in an option of its own.
    if not value or any(c in value for c in "\r\n"):
        raise ValueError(f"{name} must be a non-empty single line, got {value!r}")
    return value


def _listener(config: MosquittoConfig) -> list[str]:
    if not 0 < config.listen_port < 65536:
        raise ValueError(f"listen_port {config.listen_port} is not a TCP port")
    return [
        "# One set of auth settings for every listener: 2.0.11 otherwise scopes password_file/acl_file per listener and",
        "# a listener declared before them would silently run without authentication.",
        "per_listener_settings false",
        "",
        f"listener {config.listen_port} {_check('listen_host', config.listen_host)}",
    ]


def _auth(auth: Auth) -> list[str]:
    if isinstance(auth, AnonymousAccess):
        return [
            "# Open broker: no authentication, no ACL (quick local tests only).",
            "allow_anonymous true",
            "",
            # 2.0.11 refuses every client without a username when this is on, whatever allow_anonymous says.
            "use_username_as_clientid false",
        ]
    lines = ["allow_anonymous false", f"password_file {_check('password_file', auth.password_file)}"]
    if auth.acl_file is not None:
        lines.append(f"acl_file {_check('acl_file', auth.acl_file)}")
    return [
        *lines,
        "",
        "# A node's broker username is its node id and the ACL is written against it (%u). Forcing the client id to",
        "# the username means one live session per node: a second connection with the same credentials takes over",
        "# the first instead of running beside it under another client id.",
        "use_username_as_clientid true",
    ]


def _sessions(config: MosquittoConfig) -> list[str]:
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
        "# Every node receives every member record: a join burst of N nodes queues ~N records per subscriber. The",
        "# default of 1000 queued QoS 1 messages per client silently drops records for a slow agent in a mesh larger",
        "# than that, and such an agent never sees a complete roster. Raised well past any mesh we run; memory is bounded",
        "# by max_queued_bytes. (Not 0 = unlimited: with 0, 2.0.11 drops a client that publishes a denied QoS 1 message.)",
        f"max_queued_messages {config.max_queued_messages}",
        f"max_queued_bytes {config.max_queued_bytes}",
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
    sections = [HEADER.splitlines(), _listener(config), _auth(config.auth), _sessions(config), _process(config)]
    return "\n\n".join("\n".join(section) for section in sections if section) + "\n"
