"""What the chat window says: the texts of peers, messages, the conversation title and the status bar.

Pure: no Qt and no I/O here, so every wording is tested without a window (tests/unit/test_chat_display.py).
Rich texts (title, status) are Qt's HTML subset; names and details from the network are escaped.
"""

from __future__ import annotations

import time

from desktop_chat.history import Record
from desktop_chat.peers import ChatPeer, PeerSnapshot

PRESENCE_COLOURS = {"online": "#2e7d32", "idle": "#f9a825", "offline": "#c62828"}


def html(text: str) -> str:
    """`text` escaped for Qt's rich text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def peer_text(peer: ChatPeer, unread: int) -> str:
    """A peer's entry in the left pane: name (with an unread badge) over its mesh IP."""
    badge = f"   ● {unread} new" if unread else ""
    return f"{peer.name}{badge}\n{peer.mesh_ip}"


def record_text(record: Record) -> str:
    """A message in the conversation: who and when, its state for our own, the text, and why it failed."""
    stamp = time.strftime("%H:%M:%S", time.localtime(record.sent_at))
    if record.direction == "in":
        return f"{record.name} · {stamp}\n{record.text}"
    if record.status == "failed":
        return (f"me · {stamp} · ✗ failed — select it and Retry\n{record.text}\n"
                f"reason: {record.reason or 'unknown'}")
    state = {"sending": "sending…", "delivered": "✓ delivered"}.get(record.status, record.status)
    return f"me · {stamp} · {state}\n{record.text}"


def title_html(ip: str | None, peer: ChatPeer | None) -> str:
    """The conversation's title: nothing open, a peer that left the mesh, or the peer and its presence."""
    if ip is None:
        return "Select a peer to chat with"
    if peer is None:
        return (f"<b>{ip}</b> &nbsp;<span style='color:{PRESENCE_COLOURS['offline']}'>not a mesh member now"
                " — messages will fail</span>")
    colour = PRESENCE_COLOURS[peer.presence]
    return (f"<b>{html(peer.name)}</b> &nbsp;{ip} &nbsp;<span style='color:{colour}'>● {peer.presence}</span>"
            f" <span style='color:#666'>({html(peer.detail)})</span>")


def status_html(*, name: str, snapshot: PeerSnapshot | None, agent_error: str | None, listen: str) -> str:
    """The status bar: who we are, whether we listen, and what the agent and the control plane say."""
    me = f"me: {html(name)} {snapshot.self_ip or '(no mesh IP yet)'}" if snapshot else "me: ?"
    if agent_error:
        agent = (f"<span style='color:{PRESENCE_COLOURS['offline']}'>agent unreachable"
                 f"{' — showing last-known peers' if snapshot else ''}</span>")
    elif snapshot is None:
        agent = "asking the agent…"
    elif snapshot.control_plane_online:
        agent = "control plane online"
    else:
        agent = (f"<span style='color:{PRESENCE_COLOURS['idle']}'>control plane down — "
                 "agent keeps last-known membership</span>")
    return f"{me} · {listen} · {agent}"
