"""Two chat endpoints on loopback (127.0.0.2 and 127.0.0.3): delivery with acks, failures with reasons,
refusal of non-members, and live membership from a stub agent over the real local API socket."""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time

import pytest
from polling import wait_for

from desktop_chat.agentstub import StubAgent
from desktop_chat.errors import DeliveryError
from desktop_chat.framing import ChatMessage
from desktop_chat.history import MemoryHistory
from desktop_chat.peers import AgentPeerSource, MemoryPeerSource, PeerDirectory, static_status
from desktop_chat.session import ChatSession, PeerPoller
from desktop_chat.transport import ChatServer, ListenError, send_message
from meshcontract.localapi import AgentStatus, PeerView

A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"



def make_session(ip: str, port: int, members: list[str], name: str) -> ChatSession:
    directory = PeerDirectory()
    directory.update(MemoryPeerSource(static_status(self_ip=ip, name=name, member_ips=members, now=time.time()))
                     .snapshot(now=time.time()))
    return ChatSession(history=MemoryHistory(), directory=directory, port=port, timeout=2.0, name=name)


@pytest.fixture(autouse=True)
def debug_logs(caplog):
    """Every log call really formats its record (extra= fields included), so a bad one fails the test."""
    caplog.set_level(logging.DEBUG)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((A, 0))
        return s.getsockname()[1]


@pytest.fixture
def pair():
    """Alice on 127.0.0.2 and Bob on 127.0.0.3, same random port, each a member for the other."""
    for _ in range(20):
        port = free_port()
        alice = make_session(A, port, [B], "alice")
        bob = make_session(B, port, [A], "bob")
        try:
            alice.ensure_listening()
            bob.ensure_listening()
        except ListenError:
            alice.close()
            bob.close()
            continue
        try:
            yield alice, bob
        finally:
            alice.close(wait=2)
            bob.close(wait=2)
        return
    pytest.fail("no port free on both 127.0.0.2 and 127.0.0.3")


def test_two_endpoints_exchange_messages(pair):
    alice, bob = pair
    record = alice.send_now(B, "hello bob")
    assert (record.status, record.reason) == ("delivered", None)
    [got] = bob.history.conversation(A)
    assert (got.direction, got.name, got.text, got.read) == ("in", "alice", "hello bob", False)
    assert alice.send_now(B, "second").status == "delivered"
    assert bob.send_now(A, "hi alice").status == "delivered"
    assert [r.text for r in bob.history.conversation(A)] == ["hello bob", "second", "hi alice"]
    assert [r.direction for r in alice.history.conversation(B)] == ["out", "out", "in"]


def test_background_send_notifies_subscribers(pair):
    alice, bob = pair
    seen = []
    alice.subscribe(seen.append)
    arrived = []
    bob.subscribe(arrived.append)
    alice.send(B, "async")
    wait_for(lambda: any(r.status == "delivered" for r in seen), what="delivered notification")
    assert [r.status for r in seen] == ["sending", "delivered"]
    assert [(r.peer_ip, r.text) for r in arrived] == [(A, "async")]


def test_a_resent_message_is_stored_once(pair):
    alice, bob = pair
    msg = ChatMessage("dup-0000001", "alice", time.time(), "only once")
    send_message(B, bob.port, msg, timeout=2, source_ip=A)
    send_message(B, bob.port, msg, timeout=2, source_ip=A)  # as after a lost ack: acked again
    assert [r.text for r in bob.history.conversation(A)] == ["only once"]


def test_failure_when_the_peer_is_gone_then_retry_succeeds(pair):
    alice, bob = pair
    bob.close()
    failed = alice.send_now(B, "are you there?")
    assert failed.status == "failed"
    assert "connection refused" in failed.reason
    bob.ensure_listening()
    alice.retry(B, failed.msg_id)
    wait_for(lambda: alice.history.get(B, failed.msg_id).status == "delivered", what="retry delivered")
    assert [r.text for r in bob.history.conversation(A)] == ["are you there?"]


def test_non_member_is_refused_with_a_reason(pair, caplog):
    alice, bob = pair
    mallory = make_session(C, alice.port, [B], "mallory")
    try:
        record = mallory.send_now(B, "let me in")
    finally:
        mallory.close()
    assert record.status == "failed"
    assert f"{C} is not a current mesh member" in record.reason
    assert bob.history.conversation(C) == []
    assert any("not a current mesh member" in r.getMessage() for r in caplog.records)


@pytest.fixture
def silent_server():
    """A TCP listener on 127.0.0.3 that accepts and reads but never answers."""
    listener = socket.socket()
    listener.bind((B, 0))
    listener.listen(4)
    held = []
    try:
        yield listener, held
    finally:
        for conn in held:
            conn.close()
        listener.close()


def test_no_ack_times_out_with_a_reason(silent_server):
    listener, held = silent_server
    port = listener.getsockname()[1]
    msg = ChatMessage("noack-000001", "alice", time.time(), "hello?")
    start = time.monotonic()
    with pytest.raises(DeliveryError) as err:
        # The kernel completes the handshake from the backlog; nobody ever acks.
        send_message(B, port, msg, timeout=0.5, source_ip=A)
    assert "no ack" in err.value.reason
    assert time.monotonic() - start < 3


def test_connect_timeout_when_syns_go_unanswered():
    """A full accept queue makes Linux drop SYNs: on loopback that looks like a peer behind a dead tunnel."""
    with socket.socket() as listener:
        listener.bind((B, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        try:
            for s in fillers:
                s.setblocking(False)
                s.connect_ex((B, port))
            _, writable, _ = select.select([], fillers, [], 5)
            assert writable, "no filler connection completed"
            start = time.monotonic()
            with pytest.raises(DeliveryError) as err:
                send_message(B, port, ChatMessage("syn-00000001", "a", 1.0, "x"), timeout=0.5, source_ip=A)
            assert "timed out" in err.value.reason
            assert time.monotonic() - start < 3
        finally:
            for s in fillers:
                s.close()


def test_closed_without_ack(silent_server):
    listener, held = silent_server
    port = listener.getsockname()[1]

    def accept_and_close():
        conn, _ = listener.accept()
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=accept_and_close, daemon=True)
    t.start()
    with pytest.raises(DeliveryError) as err:
        send_message(B, port, ChatMessage("close-000001", "a", 1.0, "x"), timeout=2, source_ip=A)
    t.join(2)
    assert "without an ack" in err.value.reason or "lost" in err.value.reason


def test_names_are_not_addresses():
    with pytest.raises(DeliveryError) as err:
        send_message("bob", 7800, ChatMessage("name-0000001", "a", 1.0, "x"), timeout=1)
    assert "not an IP address" in err.value.reason


def test_server_survives_bad_frames(pair):
    alice, bob = pair
    for garbage in (b"\xff\xff\xff\xff", struct.pack(">I", 5) + b"nope!", b"\x00"):
        with socket.socket() as s:
            s.bind((A, 0))
            s.connect((B, bob.port))
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(2)
            assert s.recv(100) == b""  # closed without an ack
    assert alice.send_now(B, "still works").status == "delivered"


def test_listen_error_names_the_address():
    server = ChatServer(bind="192.0.2.1", port=0, is_member=lambda ip: True, on_message=lambda ip, m: None)
    with pytest.raises(ListenError) as err:
        server.start()
    assert "192.0.2.1" in str(err.value)


def agent_status(self_ip: str, peers: list[tuple[str, str]], *, registrar: bool = True) -> AgentStatus:
    return AgentStatus(
        node_id="alice", name="alice", mesh_ip=self_ip, prefix_len=16, interface="mc0",
        broker_connected=registrar, registrar_online=registrar, membership_revision=1, membership_complete=True,
        peers=[PeerView(node_id=name, name=name, mesh_ip=ip, public_key="k", state="active", configured=True,
                        latest_handshake=time.time()) for ip, name in peers],
        now=time.time(),
    )


def test_membership_follows_the_agent_live(tmp_path, pair):
    """Bob's membership comes from a stub agent; when Alice leaves the mesh Bob refuses her."""
    alice, _ = pair
    with StubAgent(tmp_path / "agent.sock", agent_status(C, [(A, "alice")])) as agent:
        directory = PeerDirectory()
        carol = ChatSession(history=MemoryHistory(), directory=directory, port=alice.port, timeout=2.0)
        poller = PeerPoller(AgentPeerSource(agent.socket_path), directory, interval=0.05,
                            on_update=lambda snap, err: carol.ensure_listening())
        poller.start()
        try:
            wait_for(lambda: carol.listening, what="carol listening on her mesh IP from the agent")
            assert carol.name == "alice"  # the agent's name for us, display only
            assert alice.send_now(C, "hi carol").status == "delivered"
            agent.set_status(agent_status(C, []))
            wait_for(lambda: not directory.is_member(A), what="alice gone from carol's members")
            refused = alice.send_now(C, "still there?")
            assert refused.status == "failed" and "not a current mesh member" in refused.reason
            # The agent stops answering: the last-known membership stays.
            agent.set_status(agent_status(C, [(A, "alice")], registrar=False))
            wait_for(lambda: directory.is_member(A), what="alice back")
            agent.stop()
            wait_for(lambda: poller.poll_once()[1], what="poll error once the agent is gone")
            assert directory.is_member(A)
            assert alice.send_now(C, "control plane down, data plane fine").status == "delivered"
        finally:
            poller.stop()
            carol.close()
