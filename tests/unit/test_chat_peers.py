"""Peer presence (tunnel + membership) and the snapshot the chat shows: pure, table-driven."""

from __future__ import annotations

import pytest

from desktop_chat.peers import MemoryPeerSource, PeerDirectory, presence, snapshot_from_status, static_status
from meshcontract.localapi import AgentStatus, PeerView

NOW = 1_000_000.0


def view(ip="100.96.0.2", name="bob", *, state="active", configured=True, handshake=None):
    return PeerView(node_id=f"n-{ip}", name=name, mesh_ip=ip, public_key="k", state=state, configured=configured,
                    latest_handshake=handshake)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (view(handshake=NOW - 5), "online"),
        (view(handshake=NOW - 180), "online"),
        (view(handshake=NOW + 2), "online"),  # clock skew between reads: still fresh
        (view(handshake=NOW - 181), "idle"),
        (view(handshake=None), "idle"),
        (view(state="unreachable", handshake=NOW - 5), "offline"),
        (view(configured=False, handshake=NOW - 5), "offline"),
        # the control plane lost it but its tunnel works: not offline
        (view(state="control_lost", handshake=NOW - 5), "online"),
        (view(state="suspect", handshake=NOW - 5), "online"),
        (view(state="control_lost", handshake=NOW - 500), "idle"),
    ],
)
def test_presence(peer, expected):
    assert presence(peer, now=NOW)[0] == expected


def test_presence_says_which_plane_is_lost():
    assert presence(view(state="control_lost", handshake=NOW - 5), now=NOW)[1] == (
        "handshake 5s ago; control plane lost, tunnel alive"
    )
    assert "control plane" not in presence(view(handshake=NOW - 5), now=NOW)[1]


def test_presence_window_is_configurable():
    assert presence(view(handshake=NOW - 30), now=NOW, window=10)[0] == "idle"


def status(peers, *, broker=True, registrar=True):
    return AgentStatus(node_id="me", name="alice", mesh_ip="100.96.0.1", prefix_len=16, interface="meshvpn0",
                       broker_connected=broker, registrar_online=registrar, membership_revision=3,
                       membership_complete=True, peers=peers, now=NOW)


def test_snapshot_sorts_by_name_then_ip_and_reports_the_control_plane():
    snap = snapshot_from_status(
        status([view("100.96.0.10", "carol"), view("100.96.0.9", "Bob"), view("100.96.0.3", "bob")],
               registrar=False),
        now=NOW,
    )
    assert [p.mesh_ip for p in snap.peers] == ["100.96.0.3", "100.96.0.9", "100.96.0.10"]
    assert (snap.self_ip, snap.self_name, snap.control_plane_online) == ("100.96.0.1", "alice", False)


def test_directory_membership():
    directory = PeerDirectory()
    assert not directory.is_member("100.96.0.2")
    source = MemoryPeerSource(status([view("100.96.0.2"), view("100.96.0.3", "carol", state="unreachable")]))
    directory.update(source.snapshot(now=NOW))
    assert directory.is_member("100.96.0.2")
    assert directory.is_member("::ffff:100.96.0.2")
    assert directory.is_member("100.96.0.3")  # listed: membership, not presence, decides
    assert not directory.is_member("100.96.0.4")
    assert not directory.is_member("not an ip")
    assert directory.get("100.96.0.2").name == "bob"


def test_a_member_that_joined_since_the_last_poll_is_asked_for_not_refused():
    clock = [100.0]
    directory = PeerDirectory(refresh_gap_s=0.5, clock=lambda: clock[0])
    source = MemoryPeerSource(status([view("100.96.0.2")]))
    directory.update(source.snapshot(now=NOW))
    asked = []

    def refresh() -> None:
        asked.append(clock[0])
        directory.update(source.snapshot(now=NOW))

    directory.set_refresher(refresh)
    assert directory.is_member("100.96.0.2") and asked == [], "a known member costs no question"
    source.set_status(status([view("100.96.0.2"), view("100.96.0.4", "dave")]))  # n4 joined after the poll
    assert directory.is_member("100.96.0.4") and asked == [100.0]
    assert not directory.is_member("100.96.0.9") and asked == [100.0], "a second miss within the gap asks nobody"
    clock[0] += 0.6
    assert not directory.is_member("100.96.0.9") and asked == [100.0, 100.6], "a stranger is refused after asking"


def test_static_status_lists_allowed_ips_online():
    snap = snapshot_from_status(static_status(self_ip="127.0.0.2", name="me", member_ips=["127.0.0.3"], now=NOW),
                                now=NOW)
    assert [(p.mesh_ip, p.presence) for p in snap.peers] == [("127.0.0.3", "online")]


def test_snapshot_leaves_out_ourselves():
    snap = snapshot_from_status(status([view("100.96.0.1", "alice"), view("100.96.0.2", "bob")]), now=NOW)
    assert [p.mesh_ip for p in snap.peers] == ["100.96.0.2"]


def test_a_shared_name_is_shown_with_the_node_id():
    snap = snapshot_from_status(
        status([view("100.96.0.2", "bob"), view("100.96.0.3", "bob"), view("100.96.0.4", "alice"),
                view("100.96.0.5", "carol")]),
        now=NOW,
    )  # fmt: skip
    names = {p.mesh_ip: p.name for p in snap.peers}
    assert names == {
        "100.96.0.2": "bob (n-100.96.0.2)",
        "100.96.0.3": "bob (n-100.96.0.3)",
        "100.96.0.4": "alice (n-100.96.0.4)",  # our own name
        "100.96.0.5": "carol",
    }
