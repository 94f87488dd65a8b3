"""Who we can talk to: the peer list from the local node agent, behind a small interface.

`presence` and `snapshot_from_status` are pure (they take `now`). `AgentPeerSource` asks the agent over
its unix socket (meshcontract.localapi); `MemoryPeerSource` serves a status set in memory (tests, and
`meshchat listen --allow`). `PeerDirectory` holds the newest snapshot for the threads that need it.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from desktop_chat.errors import PeerSourceError
from meshcontract.errors import ContractError
from meshcontract.localapi import DEFAULT_SOCKET, AgentStatus, LocalRequest, PeerView, query

# A WireGuard session is re-keyed every 2 minutes while traffic flows and expires after 3: a handshake
# older than this means the tunnel is not carrying anything now.
HANDSHAKE_WINDOW = 180.0

Presence = Literal["online", "idle", "offline"]
# What the control plane says of a member it lost, shown next to the data plane's word.
CONTROL_NOTE = {"suspect": "; control plane lost it, peers probing", "control_lost": "; control plane lost, tunnel alive"}


@dataclass(frozen=True, slots=True)
class ChatPeer:
    """A mesh member as the chat shows it. `mesh_ip` is the address; `name` is display only."""

    mesh_ip: str
    name: str
    node_id: str
    presence: Presence
    detail: str  # why this presence, in words, for tooltips and logs
    latest_handshake: float | None = None


@dataclass(frozen=True, slots=True)
class PeerSnapshot:
    """This node and its peers at one moment, as read from the agent."""

    self_ip: str | None
    self_name: str
    peers: tuple[ChatPeer, ...]
    control_plane_online: bool
    taken_at: float


def presence(peer: PeerView, *, now: float, window: float = HANDSHAKE_WINDOW) -> tuple[Presence, str]:
    """Whether `peer` is reachable now, following both membership and the tunnel. Pure.

    online: a member with a configured tunnel that completed a handshake within `window` seconds — also one the
    control plane lost while its tunnel still works ("control plane lost, tunnel alive" is not offline).
    idle: a member with a tunnel but no recent handshake; WireGuard only handshakes when there is traffic
    (unless keepalive is on), so a message may well get through and will bring it online.
    offline: the registrar marked it unreachable (lost on both planes, or it left), or no tunnel is configured.
    """
    if peer.state == "unreachable":
        return "offline", "membership unreachable"
    if not peer.configured:
        return "offline", "no tunnel configured"
    control = CONTROL_NOTE.get(peer.state, "")
    if peer.latest_handshake is None:
        return "idle", "tunnel configured, no handshake yet" + control
    age = now - peer.latest_handshake
    if age <= window:
        return "online", f"handshake {max(age, 0):.0f}s ago" + control
    return "idle", f"last handshake {age:.0f}s ago" + control


def snapshot_from_status(status: AgentStatus, *, now: float, window: float = HANDSHAKE_WINDOW) -> PeerSnapshot:
    """The chat's view of an AgentStatus: peers with their presence, sorted by name then IP. Pure."""
    peers = []
    others = [v for v in status.peers if v.mesh_ip != status.mesh_ip]  # we are not our own peer
    names = Counter([status.name, *(v.name for v in others)])
    for view in others:
        state, detail = presence(view, now=now, window=window)
        # Names are display aliases and may repeat: a shared one is shown with the node id, never guessed.
        name = f"{view.name} ({view.node_id})" if names[view.name] > 1 else view.name
        peers.append(ChatPeer(view.mesh_ip, name, view.node_id, state, detail, view.latest_handshake))
    peers.sort(key=lambda p: (p.name.lower(), ipaddress.ip_address(p.mesh_ip)))
    return PeerSnapshot(
        self_ip=status.mesh_ip,
        self_name=status.name,
        peers=tuple(peers),
        control_plane_online=status.broker_connected and status.registrar_online,
        taken_at=now,
    )


class PeerSource(Protocol):
    """Where the peer list comes from."""

    def snapshot(self, *, now: float) -> PeerSnapshot:
        """The current peers; PeerSourceError if they cannot be read."""


class AgentPeerSource:
    """Reads the peer list from the local node agent's unix socket (blocking; call it off the UI thread)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, timeout: float = 2.0,
                 window: float = HANDSHAKE_WINDOW) -> None:
        self.socket_path = socket_path
        self._timeout = timeout
        self._window = window

    def status(self) -> AgentStatus:
        """The agent's raw status; PeerSourceError if it cannot be had."""
        try:
            response = query(LocalRequest(op="status"), socket_path=self.socket_path, timeout=self._timeout)
        except ContractError as exc:
            raise PeerSourceError(str(exc)) from exc
        if not response.ok or response.status is None:
            raise PeerSourceError(f"agent at {self.socket_path} refused status: {response.error}")
        return response.status

    def snapshot(self, *, now: float) -> PeerSnapshot:
        return snapshot_from_status(self.status(), now=now, window=self._window)


class MemoryPeerSource:
    """A PeerSource over an AgentStatus held in memory; `set_status(None)` simulates an unreachable agent."""

    def __init__(self, status: AgentStatus | None = None, *, window: float = HANDSHAKE_WINDOW) -> None:
        self._status = status
        self._window = window
        self._lock = threading.Lock()

    def set_status(self, status: AgentStatus | None) -> None:
        with self._lock:
            self._status = status

    def snapshot(self, *, now: float) -> PeerSnapshot:
        with self._lock:
            status = self._status
        if status is None:
            raise PeerSourceError("no agent status (memory source is empty)")
        return snapshot_from_status(status, now=now, window=self._window)


def static_status(*, self_ip: str | None, name: str, member_ips: list[str], now: float) -> AgentStatus:
    """An AgentStatus listing `member_ips` as active peers with fresh handshakes (for `listen --allow`)."""
    peers = [
        PeerView(node_id=f"static-{i}", name=ip, mesh_ip=ip, public_key="-", state="active", configured=True,
                 latest_handshake=now)
        for i, ip in enumerate(member_ips)
    ]
    return AgentStatus(node_id="static", name=name, mesh_ip=self_ip, prefix_len=None, interface="-",
                       broker_connected=False, registrar_online=False, membership_revision=0,
                       membership_complete=True, peers=peers, now=now)


class PeerDirectory:
    """The newest PeerSnapshot, shared between the poller, the chat server and the UI. Thread-safe.

    Membership for the server's check is "listed by the agent now", whatever the presence: a member the
    registrar marked unreachable has no tunnel, so its packets cannot arrive through the mesh anyway.
    When the agent stops answering, the last snapshot stays (the agent itself keeps last-known membership).
    An address not in the snapshot is looked up once more through the refresher (the poller's), at most every
    `refresh_gap_s`: a member that joined since the last poll must not be refused its first message.
    """

    def __init__(self, *, refresh_gap_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._snapshot: PeerSnapshot | None = None
        self._by_ip: dict[str, ChatPeer] = {}
        self._refresher: Callable[[], None] | None = None
        self._refresh_gap_s = refresh_gap_s
        self._clock = clock
        self._refreshed_at: float | None = None

    def set_refresher(self, refresh: Callable[[], None]) -> None:
        """`refresh()` reads the agent again and calls `update`; asked on a miss of `is_member`."""
        self._refresher = refresh

    def update(self, snapshot: PeerSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            self._by_ip = {p.mesh_ip: p for p in snapshot.peers}

    @property
    def snapshot(self) -> PeerSnapshot | None:
        with self._lock:
            return self._snapshot

    def is_member(self, ip: str) -> bool:
        """Whether `ip` is a mesh member we know of now (IPv4-mapped IPv6 addresses are unwrapped); on a miss the
        agent is asked again first (see the class docstring)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        with self._lock:
            if str(addr) in self._by_ip:
                return True
            now = self._clock()
            refresh = self._refresher
            if refresh is None or (self._refreshed_at is not None and now - self._refreshed_at < self._refresh_gap_s):
                return False
            self._refreshed_at = now
        refresh()
        with self._lock:
            return str(addr) in self._by_ip

    def get(self, ip: str) -> ChatPeer | None:
        with self._lock:
            return self._by_ip.get(ip)
