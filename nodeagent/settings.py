"""The node agent's settings: one model, loaded once by the CLI (TOML file, MESHVPN_* environment, flags).

Values that depend on the machine (node id, hostname, endpoint candidates, broker credentials) are resolved
by `nodeagent.statestore`, `nodeagent.underlay` and `nodeagent.agent`, not here: this module is data only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshcontract.localapi import DEFAULT_SOCKET
from meshcontract.topics import is_valid_id
from meshcontract.transport import BrokerSettings

DEFAULT_INTERFACE = "meshvpn0"
DEFAULT_LISTEN_PORT = 51820
DEFAULT_STATE_DIR = Path("/var/lib/meshvpn")


class AgentSettings(BaseModel):
    """Everything `meshvpn-agent` can be told. See compose/systemd/agent.example.toml for a commented file.

    A node joins with `registrar_url` and `join_token` once (nodeagent.enrollment); after that it needs neither:
    enrollment.json in the state directory says where the broker is and whom to trust. `broker` overrides the
    broker the registrar named. broker.username defaults to the node id; broker.password is for pre-provisioned
    credentials only, otherwise the agent logs in with its own password (state_dir/broker_password).
    """

    model_config = ConfigDict(extra="forbid")

    registrar_url: str | None = None  # https://HOST:PORT of the registrar's API, needed to enroll
    join_token: str | None = Field(default=None, repr=False)  # mvj_<secret>.<pin>, needed to enroll
    broker: BrokerSettings | None = None  # default: the broker the registrar named at enrollment
    mesh: str = "mesh"
    name: str | None = None  # display alias; default: the hostname
    node_id: str | None = None  # default: generated once and kept in state_dir/node_id
    interface: str = Field(default=DEFAULT_INTERFACE, min_length=1, max_length=15)
    listen_port: int = Field(default=DEFAULT_LISTEN_PORT, ge=1, le=65535)
    # A public HOST[:PORT] to advertise (an address, a port forward, a DNS name), besides the interface addresses
    # and the reflexive address the registrar sees (docs/agent.md, "Endpoint candidates").
    endpoint: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    backend: Literal["auto", "kernel", "userspace", "memory"] = "auto"
    socket_path: Path = Path(DEFAULT_SOCKET)
    # Root-only by default: status and ping leak mesh topology. A chat running as a user needs e.g. 0o660 and
    # a group on the socket (see docs/agent.md).
    socket_mode: int = Field(default=0o600, ge=0, le=0o777)
    socket_group: str | None = None
    keep_interface_on_stop: bool = True
    reconcile_interval_s: float = Field(default=10.0, gt=0, le=3600)
    register_timeout_s: float = Field(default=5.0, gt=0, le=600)
    persistent_keepalive_s: int | None = Field(default=None, ge=0, le=65535)  # default: the mesh's setting
    log_json: bool = False
    log_level: str = "INFO"

    @field_validator("mesh")
    @classmethod
    def _mesh(cls, value: str) -> str:
        if not is_valid_id(value):
            raise ValueError(f"mesh name {value!r} must be lowercase letters, digits, '-' or '_'")
        return value

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_id(value):
            raise ValueError(f"node id {value!r} must be lowercase letters, digits, '-' or '_'")
        return value

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal_mode(cls, value: object) -> object:
        # Environment variables and flags arrive as text; "0660" and "660" both mean octal there, as in chmod.
        if isinstance(value, str):
            try:
                return int(value.removeprefix("0o"), 8)
            except ValueError:
                raise ValueError(f"socket_mode {value!r} is not an octal mode such as 0660") from None
        return value
