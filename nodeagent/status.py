"""What `meshctl status` shows: this agent and its peers, merged from membership and WireGuard. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meshcontract.localapi import AgentStatus, PeerView
from meshcontract.messages import MemberRecord
from nodeagent.errors import AgentError
from nodeagent.identity import Identity
from nodeagent.statestore import Registration
from wgctl.model import PeerState


def peer_views(
    records: Iterable[MemberRecord],
    actual: Mapping[str, PeerState],
    *,
    self_id: str,
    problems: Mapping[str, str] | None = None,
) -> list[PeerView]:
    """Every member but ourselves, sorted by name, with what WireGuard says about its peer (if configured) and
    what is wrong with it (`problems`, by node id: a skipped record, a peer without a usable endpoint)."""
    problems = problems or {}
    peers = []
    for record in sorted(records, key=lambda r: (r.name, r.node_id)):
        if record.node_id == self_id:
            continue
        state = actual.get(record.public_key)
        peers.append(
            PeerView(
                node_id=record.node_id,
                name=record.name,
                mesh_ip=record.mesh_ip,
                public_key=record.public_key,
                state=str(record.state),
                configured=state is not None,
                endpoint=state.endpoint if state else None,
                latest_handshake=state.latest_handshake if state else None,
                rx_bytes=state.rx_bytes if state else 0,
                tx_bytes=state.tx_bytes if state else 0,
                problem=_short(problems.get(record.node_id)),
            )
        )
    return peers


def _short(problem: str | None, limit: int = 300) -> str | None:
    return problem if problem is None or len(problem) <= limit else problem[: limit - 3] + "..."


def agent_status(
    *,
    identity: Identity,
    interface: str,
    registration: Registration | None,
    records: Iterable[MemberRecord],
    actual: Mapping[str, PeerState],
    broker_connected: bool,
    registrar_online: bool,
    registered: bool,
    revision: int,
    complete: bool,
    counters: Mapping[str, int],
    now: float,
    problems: Mapping[str, str] | None = None,
) -> AgentStatus:
    """The AgentStatus for the local API from one consistent reading of the agent's parts."""
    return AgentStatus(
        node_id=identity.node_id,
        name=identity.name,
        mesh_ip=registration.mesh_ip if registration else None,
        prefix_len=registration.prefix_len if registration else None,
        interface=interface,
        broker_connected=broker_connected,
        registrar_online=registrar_online,
        ready=registered,
        membership_revision=revision,
        membership_complete=complete,
        peers=peer_views(records, actual, self_id=identity.node_id, problems=problems),
        counters=dict(counters),
        now=now,
    )


def resolve_target(records: list[MemberRecord], target: str) -> MemberRecord:
    """The member `target` names: a mesh IP or node id (unique), or a name if exactly one member has it.
    AgentError listing the candidates when a name is shared: names are display aliases, we never guess. Pure."""
    exact = [r for r in records if target in (r.mesh_ip, r.node_id)]
    if exact:
        return exact[0]
    named = sorted((r for r in records if r.name == target), key=lambda r: r.node_id)
    if len(named) == 1:
        return named[0]
    if not named:
        raise AgentError(f"no mesh member named or addressed {target!r}")
    listed = ", ".join(f"{r.node_id} ({r.mesh_ip})" for r in named)
    raise AgentError(f"{len(named)} members are named {target!r}: {listed}; give a node id or mesh IP")
