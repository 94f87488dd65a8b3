"""`meshlab exec NODE -- CMD`: the command runs on that node, talks to that node's own agent, and owns its signals.

Operators run `meshctl` and `meshchat` on a lab node exactly as on a machine of its own: no --socket, because
`meshlab exec` sets MESHVPN_SOCKET to the node's agent socket. `meshlab exec` becomes the command (exec), so a
SIGTERM or Ctrl-C meant for it reaches the command and the command's exit status is what the shell sees. One
2-node lab (embedded broker) for the module; meshlab runs as a subprocess, the way an operator runs it.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from netns import lab_missing

from meshlab import system
from meshlab.lab import Lab, new_lab_id
from meshlab.settings import LabSettings

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]

NODES = ["n1", "n2"]
JOIN_DEADLINE = 30.0
REPO = Path(__file__).resolve().parents[2]


def _missing() -> str | None:
    return lab_missing("ip", "ss", "wireguard-go", "wg")


@pytest.fixture(scope="module")
def lab():
    reason = _missing()
    if reason:
        print(f"skipping the meshlab exec tests: {reason}")
        pytest.skip(reason)
    # Short on purpose: agent sockets live in the lab directory and unix socket paths are limited.
    lab_dir = Path(tempfile.mkdtemp(prefix="mlx-"))
    lab = Lab(LabSettings(lab_dir=lab_dir, broker="embedded", join_timeout_s=JOIN_DEADLINE),
              report=lambda line: print(f"[lab] {line}"))
    lab_id = new_lab_id()
    try:
        lab.up(len(NODES), lab_id=lab_id)
        lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)
        yield lab
    finally:
        lab.down()
        shutil.rmtree(lab_dir, ignore_errors=True)
        assert not [ns for ns in system.list_namespaces() if ns.startswith(f"ml{lab_id}-")], "down left namespaces"


def meshlab(lab: Lab, *args: str) -> list[str]:
    return [sys.executable, "-m", "meshlab.cli", "--lab-dir", str(lab.store.root), *args]


def _env() -> dict[str, str]:
    # As an operator's shell: no MESHVPN_SOCKET of its own; the checkout importable.
    env = {k: v for k, v in os.environ.items() if k != "MESHVPN_SOCKET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def run_meshlab(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(meshlab(lab, *args), capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO)


@pytest.mark.parametrize("node", NODES)
def test_meshctl_status_json_asks_the_nodes_own_agent(lab, node):
    result = run_meshlab(lab, "exec", node, "--", "meshctl", "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert (status["name"], status["mesh_ip"]) == (node, lab.mesh_ip(node))
    others = [n for n in NODES if n != node]
    assert sorted(p["name"] for p in status["peers"]) == others


def test_meshctl_ping_json_over_the_mesh(lab):
    result = run_meshlab(lab, "exec", "n1", "--", "meshctl", "ping", "n2", "-c", "2", "--json")
    assert result.returncode == 0, result.stderr
    ping = json.loads(result.stdout)
    assert ping["mesh_ip"] == lab.mesh_ip("n2")
    assert any(rtt is not None for rtt in ping["rtts_ms"]), ping


def test_exit_status_is_the_commands(lab):
    assert run_meshlab(lab, "exec", "n1", "--", "sh", "-c", "exit 7").returncode == 7


def wait_line(proc: subprocess.Popen, line: str, *, timeout: float) -> None:
    """Wait until `proc` printed `line` on stdout (raw reads with a deadline; nothing else is read past it)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (line + "\n").encode() not in seen and (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                seen += chunk
    assert (line + "\n").encode() in seen, f"no {line!r} within {timeout} s: {seen!r}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_reach_the_command(lab, sig):
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *_: (print('got TERM', flush=True), sys.exit(3)))\n"
              "signal.signal(signal.SIGINT, lambda *_: (print('got INT', flush=True), sys.exit(4)))\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen(meshlab(lab, "exec", "n1", "--", sys.executable, "-c", script), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        wait_line(proc, "ready", timeout=30)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    expected = {signal.SIGTERM: (3, "got TERM"), signal.SIGINT: (4, "got INT")}[sig]
    assert (proc.returncode, out.strip()) == expected, err


def read_events(proc: subprocess.Popen, *, until: str, timeout: float) -> list[dict]:
    """JSON events `proc` printed on stdout, up to and including the first whose "event" is `until`."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer, events = b"", []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip().startswith(b"{"):
                    events.append(json.loads(line))
                    if events[-1].get("event") == until:
                        return events
    raise AssertionError(f"no {until!r} event within {timeout} s: {events} {buffer!r}")


def test_meshchat_talks_to_the_nodes_own_agent(lab):
    # listen binds to the mesh IP its agent reports and accepts only members its agent knows; send names
    # itself with its agent's identity: neither works with another node's agent or none.
    with subprocess.Popen(meshlab(lab, "exec", "n2", "--", "meshchat", "listen", "--json", "--count", "1"),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO) as listener:
        try:
            listening = read_events(listener, until="listening", timeout=30)[-1]
            assert listening["ip"] == lab.mesh_ip("n2"), listening
            sent = run_meshlab(lab, "exec", "n1", "--", "meshchat", "send", "--to", lab.mesh_ip("n2"),
                               "--timeout", "10", "hello n2 via meshlab exec")
            assert sent.returncode == 0, sent.stderr
            message = read_events(listener, until="message", timeout=15)[-1]
            assert (message["from_ip"], message["text"]) == (lab.mesh_ip("n1"), "hello n2 via meshlab exec")
            assert listener.wait(timeout=15) == 0
        finally:
            if listener.poll() is None:
                listener.kill()
