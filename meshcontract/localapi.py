"""The node agent's local API: what meshctl and the desktop chat ask the agent over its unix socket.

Protocol: the client connects, sends one JSON object (LocalRequest) terminated by a newline, and reads one JSON
object (LocalResponse) terminated by a newline; then the connection closes. No I/O here except the tiny
blocking client `query`, which tools use.

Who may ask what: the socket's permissions decide who may connect (root only by default; a group such as the
desktop chat's with `socket_mode = 0o660`). Among them, the read-only ops are open to all; an op that changes
the node needs the caller (its uid as the kernel reports it, SO_PEERCRED) to be root or the agent's own user.
"""

from __future__ import annotations

import json
import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from meshcontract.errors import ContractError, PayloadError

DEFAULT_SOCKET = "/run/meshvpn/agent.sock"
MAX_LOCAL_MESSAGE = 4 * 1024 * 1024
# Ops that only read, open to whoever may connect. Every other op, "rotate-key" and any added later, changes the
# node: listing the harmless ones means a new op is privileged until someone decides otherwise.
READ_ONLY_OPS = frozenset({"status", "ping"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalRequest(_Model):
    """One request to the agent. `ping` needs `target` (a node name or mesh IP). `rotate-key` gives the node a
    new WireGuard key pair (same node id and mesh IP); only root or the agent's own user may ask (`refusal`)."""

    op: Literal["status", "ping", "rotate-key"]
    target: str | None = Field(default=None, max_length=64)
    count: int = Field(default=3, ge=1, le=20)


class PeerView(_Model):
    """One mesh member as this agent sees it, merged from membership and the WireGuard backend."""

    node_id: str
    name: str
    mesh_ip: str
    public_key: str
    state: str  # membership state from the registrar: active | unreachable
    configured: bool  # a WireGuard peer for it exists on the interface now
    endpoint: str | None = None
    latest_handshake: float | None = None  # unix time of the last handshake, None if never
    rx_bytes: int = 0
    tx_bytes: int = 0


class AgentStatus(_Model):
    """The agent's view of itself and its peers (`meshctl status`)."""

    node_id: str
    name: str
    mesh_ip: str | None
    prefix_len: int | None
    interface: str
    broker_connected: bool
    registrar_online: bool
    # Registered on the current broker connection: the control plane knows us and we heartbeat.
    ready: bool = False
    membership_revision: int
    membership_complete: bool
    peers: list[PeerView]
    # Totals since the agent started: peer_added / peer_updated / peer_removed / reconcile_failed /
    # reconcile_passes / registrations. Tools and tests read these instead of the agent's log text.
    counters: dict[str, int] = Field(default_factory=dict)
    now: float


class PingResult(_Model):
    """Result of `meshctl ping`: round trips in milliseconds, None for a lost probe."""

    target: str
    mesh_ip: str
    rtts_ms: list[float | None]


class RotateResult(_Model):
    """Result of `meshctl rotate-key`: the old and the new public key (the private key never leaves the agent)."""

    previous_public_key: str
    public_key: str
    mesh_ip: str | None
    # False when the registrar did not answer in time: the node uses the new key and registers it on its next
    # connection (made at once), so peers learn it as soon as the registrar does.
    confirmed: bool


class LocalResponse(_Model):
    """The one reply to a LocalRequest: either `error` or the field for the op."""

    ok: bool
    error: str | None = None
    status: AgentStatus | None = None
    ping: PingResult | None = None
    rotated: RotateResult | None = None


def refusal(op: str, *, caller_uid: int | None, agent_uid: int) -> str | None:
    """Why a caller with `caller_uid` (None: unknown) may not run `op` on an agent running as `agent_uid`, or None
    if it may. Read-only ops are open to every caller the socket lets in; the others need root or the agent's
    user, however the socket's group and mode are set."""
    if op in READ_ONLY_OPS or caller_uid in (0, agent_uid):
        return None
    who = "the caller's user is unknown" if caller_uid is None else f"you are uid {caller_uid}"
    return f"{op} changes this node: only root or the agent's own user (uid {agent_uid}) may ask, and {who}"


def query(request: LocalRequest, *, socket_path: str = DEFAULT_SOCKET, timeout: float = 10.0) -> LocalResponse:
    """Send one request to the local agent and return its response; ContractError if it cannot be reached."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(request.model_dump_json().encode() + b"\n")
            chunks = []
            total = 0
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > MAX_LOCAL_MESSAGE:
                    raise PayloadError(f"agent response over {MAX_LOCAL_MESSAGE} bytes")
                if chunk.endswith(b"\n"):
                    break
    except OSError as exc:
        raise ContractError(f"cannot reach the agent at {socket_path}: {exc}") from exc
    raw = b"".join(chunks)
    try:
        return LocalResponse.model_validate(json.loads(raw))
    except ValueError as exc:
        raise PayloadError(f"bad response from the agent at {socket_path}: {exc}") from exc
