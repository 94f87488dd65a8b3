"""What the chat window says (desktop_chat/display.py): pure texts, table-driven."""

from __future__ import annotations

import time

import pytest

from desktop_chat.display import html, peer_text, record_text, status_html, title_html
from desktop_chat.history import Record
from desktop_chat.peers import ChatPeer, PeerSnapshot

SENT = 1_700_000_000.0
STAMP = time.strftime("%H:%M:%S", time.localtime(SENT))
BOB = ChatPeer(mesh_ip="100.96.0.2", name="bob <b>", node_id="n-bob", presence="idle", detail="no handshake & idle")


def record(direction="out", status="delivered", reason=None, name="alice"):
    return Record("100.96.0.2", "0123456789abcdef", direction, name, "hello", SENT, status, reason)


@pytest.mark.parametrize(
    ("rec", "expected"),
    [
        (record("in", "received", name="bob"), f"bob · {STAMP}\nhello"),
        (record(status="sending"), f"me · {STAMP} · sending…\nhello"),
        (record(status="delivered"), f"me · {STAMP} · ✓ delivered\nhello"),
        (record(status="failed", reason="connection refused"),
         f"me · {STAMP} · ✗ failed — select it and Retry\nhello\nreason: connection refused"),
        (record(status="failed"), f"me · {STAMP} · ✗ failed — select it and Retry\nhello\nreason: unknown"),
    ],
)
def test_record_text(rec, expected):
    assert record_text(rec) == expected


@pytest.mark.parametrize(("unread", "expected"), [(0, "bob <b>\n100.96.0.2"), (3, "bob <b>   ● 3 new\n100.96.0.2")])
def test_peer_text(unread, expected):
    assert peer_text(BOB, unread) == expected  # plain text in a list item: nothing to escape


@pytest.mark.parametrize(
    ("ip", "peer", "contains"),
    [
        (None, None, ["Select a peer to chat with"]),
        ("100.96.0.9", None, ["<b>100.96.0.9</b>", "not a mesh member now"]),
        ("100.96.0.2", BOB, ["<b>bob &lt;b&gt;</b>", "● idle", "(no handshake &amp; idle)"]),
    ],
)
def test_title_html(ip, peer, contains):
    title = title_html(ip, peer)
    assert all(part in title for part in contains), title


def snapshot(*, self_ip="100.96.0.1", online=True):
    return PeerSnapshot(self_ip=self_ip, self_name="alice", peers=(), control_plane_online=online, taken_at=SENT)


@pytest.mark.parametrize(
    ("snap", "error", "contains"),
    [
        (None, None, ["me: ?", "asking the agent…"]),
        (None, "refused", ["me: ?", "agent unreachable</span>"]),
        (snapshot(), "refused", ["agent unreachable — showing last-known peers"]),
        (snapshot(), None, ["me: alice &amp; co 100.96.0.1", "control plane online"]),
        (snapshot(online=False), None, ["control plane down — agent keeps last-known membership"]),
        (snapshot(self_ip=None), None, ["(no mesh IP yet)"]),
    ],
)
def test_status_html(snap, error, contains):
    status = status_html(name="alice & co", snapshot=snap, agent_error=error, listen="listening on 100.96.0.1:7800")
    assert "· listening on 100.96.0.1:7800 ·" in status
    assert all(part in status for part in contains), status


def test_html_escapes_markup():
    assert html("<i>a & b</i>") == "&lt;i&gt;a &amp; b&lt;/i&gt;"
