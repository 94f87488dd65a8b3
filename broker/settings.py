"""Settings of the embedded broker (`meshvpn-broker`), loaded once by its CLI via meshcontract.settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class BrokerServerSettings(BaseModel):
    """Where the embedded broker listens and whom it lets in.

    Access control is on whenever a password file is set: clients then need a known username and get exactly the
    rights of meshcontract.access (within `mesh`, when set). With no password file and allow_anonymous=True the
    broker is open: anyone may connect, publish and subscribe (quick local tests). `certfile`/`keyfile` make the
    listener TLS.
    """

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=0, le=65535)  # 0: any free port (read it back from EmbeddedBroker.port)
    password_file: Path | None = None
    allow_anonymous: bool = False
    # A client that sends nothing for keepalive x this factor is disconnected and its will published
    # (MQTT 3.1.1 section 3.1.2.10 asks for 1.5).
    keepalive_factor: float = Field(default=1.5, ge=1.0, le=10.0)
    mesh: str | None = None  # the mesh whose topics the accounts may use (None: any)
    certfile: Path | None = None
    keyfile: Path | None = None
    # Largest MQTT packet accepted (as Mosquitto's max_packet_size in broker/mosquitto_config.py).
    max_packet_size: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Failed logins per source address: this many at once, then this many per second.
    failed_logins_burst: float = Field(default=10, ge=1)
    failed_logins_per_s: float = Field(default=1.0, gt=0)
    log_level: str = "INFO"
    log_json: bool = False
