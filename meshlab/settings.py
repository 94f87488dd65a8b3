"""meshlab's settings: one model, loaded once in the CLI (TOML file, MESHVPN_* environment, flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from meshlab.state import BrokerKind
from meshlab.store import DEFAULT_LAB_DIR


class LabSettings(BaseModel):
    """Where the lab lives and how its mesh is tuned. Short heartbeats make failures visible in seconds."""

    model_config = ConfigDict(extra="forbid")

    lab_dir: Path = DEFAULT_LAB_DIR
    broker: BrokerKind = "embedded"
    mesh: str = "lab"
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)
    heartbeat_ttl_s: float = Field(default=3.0, gt=0, le=600)
    # The registrar's expiry_s (how long an unreachable member keeps its identity and IP); None: its default.
    expiry_s: float | None = Field(default=None, gt=0)
    join_timeout_s: float = Field(default=30.0, gt=0, le=600)
    start_timeout_s: float = Field(default=20.0, gt=0, le=600)
