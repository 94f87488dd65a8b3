"""Settings of the embedded broker (`meshvpn-broker`), loaded once by its CLI via meshcontract.settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class BrokerServerSettings(BaseModel):
    """Where the embedded broker listens and whom it lets in.

    Access control is on whenever a password file is set (or a join-token verifier is given): clients then need
    a known username and get exactly the rights of meshcontract.access. With no password file and
    allow_anonymous=True the broker is open: anyone may connect, publish and subscribe (quick local tests).
    """

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=0, le=65535)  # 0: any free port (read it back from EmbeddedBroker.port)
    password_file: Path | None = None
    allow_anonymous: bool = False
    # A client that sends nothing for keepalive x this factor is disconnected and its will published
    # (MQTT 3.1.1 section 3.1.2.10 asks for 1.5).
    keepalive_factor: float = Field(default=1.5, ge=1.0, le=10.0)
    log_level: str = "INFO"
    log_json: bool = False
