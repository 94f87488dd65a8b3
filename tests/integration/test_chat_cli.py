"""The headless CLI as a user (or the lab) runs it: `meshchat listen` and `meshchat send` as subprocesses."""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from desktop_chat.agentstub import StubAgent
from meshcontract.localapi import AgentStatus, PeerView

A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"
ROOT = Path(__file__).resolve().parents[2]


def meshchat(*args: str) -> list[str]:
    return [sys.executable, "-m", "desktop_chat.cli", *args]


def run(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = (*args[:1], "--log-level", "DEBUG", *args[1:]) if args[:1] == ("send",) else args
    return subprocess.run(meshchat(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((B, 0))
        return s.getsockname()[1]


def wait_listening(ip: str, port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"listener exited early: {proc.communicate()}")
        with socket.socket() as s:
            # This probe is not a member and gets refused, which is fine: it only proves the port is open.
            s.settimeout(0.5)
            if s.connect_ex((ip, port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on {ip}:{port} after {timeout}s")


@pytest.fixture
def listener():
    procs = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(meshchat("listen", "--log-level", "DEBUG", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()


def test_send_and_listen(listener):
    port = free_port()
    proc = listener("--bind", B, "--allow", A, "--port", str(port), "--count", "2")
    wait_listening(B, port, proc)
    first = run("send", "--to", B, "--bind", A, "--port", str(port), "--name", "alice", "hello", "bob")
    assert first.returncode == 0, first.stderr
    assert "delivered to 127.0.0.3" in first.stderr  # the INFO log line
    # The verdict for people on stdout; no agent was asked (--bind), so the receiver has no name here.
    assert re.fullmatch(r"delivered to 127\.0\.0\.3 in \d+ ms\n", first.stdout), first.stdout
    second = run("send", "--to", B, "--bind", A, "--port", str(port), "--name", "alice", "two\nlines")
    assert second.returncode == 0, second.stderr
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert out.splitlines() == [f"{A} alice: hello bob", f"{A} alice: two\\nlines"]


def test_send_exit_codes_and_reasons(listener):
    port = free_port()
    refused = run("send", "--to", B, "--bind", A, "--port", str(port), "--timeout", "2", "anyone?")
    assert refused.returncode == 1
    assert "connection refused" in refused.stderr
    proc = listener("--bind", B, "--allow", A, "--port", str(port))
    wait_listening(B, port, proc)
    stranger = run("send", "--to", B, "--bind", C, "--port", str(port), "let me in")
    assert stranger.returncode == 1
    assert f"{C} is not a current mesh member" in stranger.stderr
    by_name = run("send", "--to", "bob", "hi")
    assert by_name.returncode == 2
    assert "not an IP address" in by_name.stderr


def test_listen_takes_ip_and_members_from_the_agent(tmp_path, listener):
    """The lab's way: `meshchat listen --socket PATH` binds the mesh IP the agent reports."""
    port = free_port()
    now = time.time()
    status = AgentStatus(
        node_id="bob", name="bob", mesh_ip=B, prefix_len=16, interface="mc0", broker_connected=False,
        registrar_online=False, membership_revision=4, membership_complete=True, now=now,
        peers=[PeerView(node_id="alice", name="alice", mesh_ip=A, public_key="k", state="active",
                        configured=True, latest_handshake=now)],
    )
    with StubAgent(tmp_path / "agent.sock", status) as agent:
        proc = listener("--socket", agent.socket_path, "--port", str(port), "--count", "1")
        wait_listening(B, port, proc)
        sent = run("send", "--to", B, "--bind", A, "--port", str(port), "--name", "alice",
                   "--state-dir", str(tmp_path / "alice"), "via the mesh")
        assert sent.returncode == 0, sent.stderr
        out, err = proc.communicate(timeout=15)
    assert out.splitlines() == [f"{A} alice: via the mesh"]
    assert (tmp_path / "alice" / "history.db").exists()


def test_listen_without_agent_or_allow_bind_is_a_usage_error():
    result = run("listen", "--allow", A)
    assert result.returncode == 2
    assert "--bind" in result.stderr


def test_gui_without_pyside6_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['PySide6'] = None; from desktop_chat.cli import main; "
            f"sys.exit(main(['--state-dir', {str(tmp_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT,
                            env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert result.returncode == 2
    assert "meshvpn[chat]" in result.stderr


def test_listen_waits_for_the_agent_to_come_up(tmp_path, listener):
    """Started before the agent (as at boot), listen waits, then binds the mesh IP the agent reports."""
    port = free_port()
    sock = tmp_path / "agent.sock"
    proc = listener("--socket", str(sock), "--port", str(port), "--count", "1")
    now = time.time()
    status = AgentStatus(
        node_id="bob", name="bob", mesh_ip=B, prefix_len=16, interface="mc0", broker_connected=True,
        registrar_online=True, membership_revision=1, membership_complete=True, now=now,
        peers=[PeerView(node_id="alice", name="alice", mesh_ip=A, public_key="k", state="active",
                        configured=True, latest_handshake=None)],
    )
    wait_stderr(proc, "waiting for the agent")
    with StubAgent(sock, status):
        wait_listening(B, port, proc)
        sent = run("send", "--to", B, "--bind", A, "--port", str(port), "--name", "alice", "good morning")
        assert sent.returncode == 0, sent.stderr
        out, _ = proc.communicate(timeout=15)
    assert out.splitlines() == [f"{A} alice: good morning"]


def wait_stderr(proc: subprocess.Popen, text: str, timeout: float = 15) -> None:
    # Raw reads: a buffered readline could swallow the line we wait for while select() sees nothing more.
    deadline = time.monotonic() + timeout
    seen = b""
    fd = proc.stderr.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while text.encode() not in seen and (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                seen += chunk
    assert text.encode() in seen, f"no {text!r} on stderr within {timeout}s: {seen!r}"


def _status(*, name: str, ip: str, peers: list[tuple[str, str]], now: float) -> AgentStatus:
    return AgentStatus(
        node_id=name, name=name, mesh_ip=ip, prefix_len=16, interface="mc0", broker_connected=True,
        registrar_online=True, membership_revision=1, membership_complete=True, now=now,
        peers=[PeerView(node_id=peer, name=peer, mesh_ip=peer_ip, public_key="k", state="active", configured=True,
                        latest_handshake=now) for peer, peer_ip in peers],
    )


def test_listen_json_and_send_through_meshvpn_socket(tmp_path, listener):
    """The lab's way: both ends find their agent through MESHVPN_SOCKET; listen reports events as JSON lines."""
    port = free_port()
    now = time.time()
    bob = StubAgent(tmp_path / "bob.sock", _status(name="bob", ip=B, peers=[("alice", A)], now=now))
    alice = StubAgent(tmp_path / "alice.sock", _status(name="alice", ip=A, peers=[("bob", B)], now=now))
    with bob, alice:
        proc = listener("--json", "--port", str(port), "--count", "1", env={"MESHVPN_SOCKET": str(bob.socket_path)})
        wait_listening(B, port, proc)
        # No --bind: alice's agent gives the source address (A) and the receiver's name.
        sent = run("send", "--to", B, "--port", str(port), "two\nlines", env={"MESHVPN_SOCKET": str(alice.socket_path)})
        assert sent.returncode == 0, sent.stderr
        assert re.fullmatch(r"delivered to bob \(127\.0\.0\.3\) in \d+ ms\n", sent.stdout), sent.stdout
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["listening", "message"], events
    assert (events[0]["ip"], events[0]["port"]) == (B, port)
    message = events[1]
    assert (message["from_ip"], message["name"], message["text"]) == (A, "alice", "two\nlines")
    assert message["msg_id"] and message["sent_at"] > 0
    assert "meshchat: listening on" not in err  # status goes to stdout as events in --json mode
