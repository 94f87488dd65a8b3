"""RegistrarSettings: everything `meshvpn-registrar` can be told, loaded once in its CLI (file, MESHVPN_*, flags)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshcontract import topics
from meshcontract.access import REGISTRAR_USER
from meshcontract.transport import BrokerSettings
from registrar import ticks

DEFAULT_NETWORK = "100.96.0.0/16"
DEFAULT_STATE_DIR = Path("/var/lib/meshvpn-registrar")


class RegistrarSettings(BaseModel):
    """The registrar's settings. Nested: MESHVPN_BROKER__URL sets broker.url."""

    model_config = ConfigDict(extra="forbid")

    mesh: str = Field(default="mesh", description="mesh name: a topic level, [a-z0-9][a-z0-9_-]*")
    network: str = Field(default=DEFAULT_NETWORK, description="the mesh prefix IPs are allocated from")
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=3600)
    heartbeat_ttl_s: float = Field(
        default=15.0,
        gt=0,
        le=86400,
        description="silence after which the control plane has lost a member (suspect: see vouch_wait_s)",
    )
    grace_s: float | None = Field(
        default=None,
        description="after start or a broker reconnect nobody is declared unreachable for this long (>= TTL; default TTL + interval)",
    )
    expiry_s: float = Field(
        default=30 * 86400.0,
        gt=0,
        description=(
            "unreachable this long: removed, IP quarantined, broker account deleted (default 30 days: a laptop "
            "away for a night or a holiday comes back with its own credential and IP, no token)"
        ),
    )
    vouch_wait_s: float = Field(
        default=3.0,
        ge=0,
        le=300,
        description=(
            "a member the control plane lost stays suspect this long while peers probe it over the mesh; one "
            "they reach stays in (control_lost, tunnels kept). 0: the control plane alone decides"
        ),
    )
    quarantine_s: float = Field(
        default=600.0, ge=0, description="a freed IP goes to nobody else for this long"
    )
    persistent_keepalive_s: int = Field(default=25, ge=0, le=65535)
    mtu: int = Field(default=1420, ge=576, le=9000)
    require_token: bool = Field(default=True, description="new nodes need a join token")

    state_dir: Path = DEFAULT_STATE_DIR
    broker: BrokerSettings = Field(default_factory=lambda: BrokerSettings(username=REGISTRAR_USER))
    embedded_broker: bool = False
    broker_listen: str = Field(default="0.0.0.0:8883", description="embedded broker HOST:PORT")
    password_file: Path | None = Field(
        default=None,
        description="the embedded broker's password file, where node accounts go (default: STATE_DIR/passwords)",
    )
    broker_accounts: Literal["auto", "dynsec", "password_file", "none"] = Field(
        default="auto",
        description=(
            "how node broker accounts are managed: dynsec (Mosquitto's dynamic security plugin), password_file (an "
            "embedded broker reading password_file), none (provisioned by hand); auto: the embedded broker's file, "
            "else dynsec when a broker admin password is known, else none"
        ),
    )
    broker_admin_password: str | None = Field(
        default=None,
        repr=False,
        description=(
            "password of Mosquitto's dynamic security admin (meshvpn.admin), with which the registrar creates and "
            "deletes node accounts; default: STATE_DIR/broker-admin.password (written by `mosquitto init`)"
        ),
    )

    tls: bool = Field(
        default=True,
        description="serve the HTTP API and the embedded broker over TLS (a loud warning when off: lab use only)",
    )
    tls_names: list[str] = Field(
        default_factory=list,
        description="extra names/addresses the TLS certificate covers (the host name, localhost and the listen "
        "addresses are always in)",
    )
    public_url: str | None = Field(
        default=None, description="how nodes reach the HTTP API (for join commands); default from http_listen"
    )
    public_broker_url: str | None = Field(
        default=None, description="the broker URL nodes get at enrollment; default from the broker settings"
    )

    http_listen: str | None = Field(
        default="0.0.0.0:8443", description="HTTP API HOST:PORT (TLS unless tls=false); empty disables"
    )
    admin_token: str | None = Field(default=None, repr=False, description="bearer token for admin endpoints")
    publish_window_s: float = Field(
        default=0.2, ge=0, le=10, description="membership publishes (delta, snapshot, records) are batched over this"
    )
    publish_max_delay_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="a burst of changes is published at most this long after its first",
    )
    will_hold_s: float = Field(
        default=0.1,
        ge=0,
        le=5,
        description=(
            "a change that is only a last will is published this long later: a stopping broker publishes every "
            "client's will and then drops us, and a record sent in between would contradict the will taken back"
        ),
    )
    offline_doubt_s: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description=(
            "on reconnecting to the broker, members made unreachable by a will that arrived this long before the "
            "connection was lost are active again (a stopping broker publishes every client's will)"
        ),
    )
    tick_interval_s: float | None = Field(
        default=None,
        gt=0,
        le=60,
        description="how often liveness is judged (< heartbeat_ttl_s; default TTL/5 between 0.05 and 1 s)",
    )

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("mesh")
    @classmethod
    def _mesh(cls, value: str) -> str:
        return topics.check_id(value, "mesh name")

    @field_validator("network")
    @classmethod
    def _network(cls, value: str) -> str:
        net = ipaddress.ip_network(value, strict=True)
        if net.num_addresses < 4 and net.version == 4 and net.prefixlen < 31:
            raise ValueError("network too small")
        return value

    @field_validator("tls_names", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        # From the environment a list arrives as one string: "a,b c".
        if isinstance(value, str):
            return [n for n in value.replace(",", " ").split() if n]
        return value

    @model_validator(mode="after")
    def _registrar_username(self) -> RegistrarSettings:
        # A partial broker table (only a password from MESHVPN_BROKER__PASSWORD, say) replaces the default whole.
        if self.broker.username is None:
            self.broker = self.broker.model_copy(update={"username": REGISTRAR_USER})
        return self

    @model_validator(mode="after")
    def _grace(self) -> RegistrarSettings:
        if self.grace_s is not None and self.grace_s < self.heartbeat_ttl_s:
            raise ValueError("grace_s must be >= heartbeat_ttl_s")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must be > heartbeat_interval_s")
        if self.tick_interval_s is not None and self.tick_interval_s >= self.heartbeat_ttl_s:
            raise ValueError("tick_interval_s must be < heartbeat_ttl_s: liveness is judged several times per TTL")
        return self

    @property
    def effective_grace_s(self) -> float:
        return self.grace_s if self.grace_s is not None else self.heartbeat_ttl_s + self.heartbeat_interval_s

    @property
    def effective_tick_interval_s(self) -> float:
        return self.tick_interval_s if self.tick_interval_s is not None else ticks.default_interval(self.heartbeat_ttl_s)

    @property
    def db_path(self) -> Path:
        return self.state_dir / "registrar.db"

    @property
    def effective_password_file(self) -> Path:
        return self.password_file if self.password_file is not None else self.state_dir / "passwords"

    @property
    def admin_socket(self) -> Path:
        """The running registrar's local admin API (0600 in the 0700 state directory): how the CLI reaches it."""
        return self.state_dir / "admin.sock"


def split_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) into its parts; ValueError if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
