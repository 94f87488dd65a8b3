"""meshchat's settings: one model, loaded once in the CLI (TOML file, MESHVPN_* environment, flags)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from desktop_chat import DEFAULT_PORT
from desktop_chat.peers import HANDSHAKE_WINDOW
from meshcontract.localapi import DEFAULT_SOCKET


def default_state_dir() -> Path:
    """Where the GUI keeps its history when no --state-dir is given: $XDG_DATA_HOME/meshchat."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "meshchat"


class ChatSettings(BaseModel):
    """Everything meshchat needs. Every address is an IP; `name` is only what peers see next to ours."""

    model_config = ConfigDict(extra="forbid")

    socket: str = Field(default=DEFAULT_SOCKET, description="the node agent's local API socket")
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535, description="chat TCP port on every mesh IP")
    bind: str | None = Field(default=None, description="listen here instead of our mesh IP (tests)")
    state_dir: Path | None = Field(default=None, description="history.db lives here; GUI default XDG data dir")
    name: str | None = Field(default=None, max_length=63, description="our display name; default: agent's")
    timeout: float = Field(default=5.0, gt=0, le=300, description="seconds to connect, send and get the ack")
    poll_interval: float = Field(default=1.0, gt=0, le=60, description="seconds between agent status polls")
    handshake_window: float = Field(default=HANDSHAKE_WINDOW, gt=0, description="a handshake this recent = online")
    allow: list[str] = Field(default_factory=list, description="static member IPs instead of the agent (tests)")
