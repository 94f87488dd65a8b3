"""meshctl as an operator runs it: which agent it asks (flag anywhere, MESHVPN_SOCKET) and what it says when it can't.

A stand-in agent (desktop_chat.agentstub.StubAgent) serves the real local API on a unix socket in a temporary
directory; meshctl runs as a subprocess, the way a shell runs it, so the environment and exit codes are real.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from desktop_chat.agentstub import StubAgent
from meshcontract.localapi import AgentStatus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="mctl", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def meshctl(*args: str, env: dict[str, str] | None = None, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "MESHVPN_SOCKET"}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([*(wrap or []), sys.executable, "-m", "nodeagent.meshctl", *args], capture_output=True,
                          text=True, timeout=30, env={**base, **(env or {})}, cwd="/")


def _status(name: str) -> AgentStatus:
    return AgentStatus(node_id=name, name=name, mesh_ip="100.96.0.7", prefix_len=16, interface="mv0",
                       broker_connected=True, registrar_online=True, membership_revision=1,
                       membership_complete=True, peers=[], now=time.time())


def test_the_agent_is_found_by_flag_anywhere_or_by_environment(short_dir: Path) -> None:
    with StubAgent(short_dir / "a.sock", _status("alpha")) as a, StubAgent(short_dir / "b.sock", _status("beta")) as b:
        by_env = meshctl("status", "--json", env={"MESHVPN_SOCKET": a.socket_path})
        assert by_env.returncode == 0, by_env.stderr
        assert json.loads(by_env.stdout)["name"] == "alpha"
        after = meshctl("status", "--socket", b.socket_path, env={"MESHVPN_SOCKET": a.socket_path})
        assert after.returncode == 0, after.stderr
        assert "beta (beta)" in after.stdout, "the flag wins over the environment"
        before = meshctl("--socket", b.socket_path, "status", "--json")
        assert json.loads(before.stdout)["name"] == "beta"


def test_no_agent_says_where_it_looked_and_how_to_look_elsewhere(short_dir: Path) -> None:
    missing = short_dir / "none.sock"
    result = meshctl("status", env={"MESHVPN_SOCKET": str(missing)})
    assert result.returncode == 2
    assert f"the agent is not running at {missing} (no socket there)" in result.stderr
    assert "--socket" in result.stderr and "MESHVPN_SOCKET" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_stale_socket_is_an_agent_not_running(short_dir: Path) -> None:
    stale = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # bound, never listening: what a killed agent leaves behind
        result = meshctl("ping", "beta", "--socket", str(stale))
    assert result.returncode == 2
    assert f"the agent is not running at {stale} (a socket is there but nobody answers)" in result.stderr


def test_permission_denied_names_the_socket_and_the_fix(short_dir: Path) -> None:
    # Root reads any socket; without CAP_DAC_OVERRIDE it is an ordinary user to a socket it does not own.
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (runs meshctl as root without CAP_DAC_OVERRIDE)"
    elif shutil.which("setpriv") is None:
        reason = "setpriv (util-linux) not installed"
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    with StubAgent(short_dir / "other.sock", _status("alpha")) as agent:
        os.chown(agent.socket_path, 65534, 65534)
        os.chmod(agent.socket_path, 0o600)  # the agent's default mode, owned by someone else
        result = meshctl("status", "--socket", agent.socket_path,
                         wrap=["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"])
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"permission denied on {agent.socket_path}: run as root or join group meshvpn" in result.stderr
