"""Who this node is: key pair, node id, display name and its configured public endpoint, resolved once at start.

The only I/O is reading or creating the state directory's identity files (StateStore). The other endpoint
candidates (interface addresses, the reflexive address) change while the agent runs: nodeagent.underlay.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

from meshcontract.messages import Endpoint, EndpointKind
from nodeagent.errors import SettingsError
from nodeagent.settings import AgentSettings
from nodeagent.statestore import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    """This node as the rest of the mesh knows it. The private key never leaves the machine."""

    node_id: str
    name: str
    private_key: str = field(default="", repr=False)
    public_key: str = ""
    endpoint: Endpoint | None = None  # the configured public endpoint (settings `endpoint`), if any

    def log_fields(self, mesh_ip: str | None = None) -> dict[str, str]:
        """node id, name and mesh IP as log fields (every membership and tunnel event carries them)."""
        return {"node_id": self.node_id, "node_name": self.name, "mesh_ip": mesh_ip or "-"}


def parse_endpoint(text: str, *, default_port: int, kind: EndpointKind = EndpointKind.PUBLIC) -> Endpoint:
    """HOST, HOST:PORT, [V6] or [V6]:PORT -> Endpoint of `kind`; SettingsError if it is not one."""
    host, port = text.strip(), default_port
    try:
        if host.startswith("["):
            inner, _, rest = host[1:].partition("]")
            host = inner
            if rest.startswith(":"):
                port = int(rest[1:])
        elif host.count(":") == 1:
            host, port_text = host.split(":")
            port = int(port_text)
        return Endpoint(host=host, port=port, kind=kind)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise SettingsError(f"endpoint {text!r} is not HOST[:PORT]: {exc}") from exc


def load_identity(settings: AgentSettings, store: StateStore, *, hostname: str | None = None) -> Identity:
    """Key pair and node id from the state directory (created on first use), name and public endpoint from
    settings."""
    from wgctl import keys  # local: keeps module import light for meshctl

    store.ensure_dir()
    private_key = store.private_key()
    return Identity(
        node_id=store.node_id(settings.node_id),
        name=settings.name or hostname or socket.gethostname(),
        private_key=private_key,
        public_key=keys.public_key(private_key),
        endpoint=parse_endpoint(settings.endpoint, default_port=settings.listen_port) if settings.endpoint else None,
    )
