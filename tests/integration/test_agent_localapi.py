"""The local API and meshctl against running agents, and `meshvpn-agent` itself as a process.

A real broker (Mosquitto) and the registrar subprocess, as in test_agent_mesh.py. Agents use the in-memory
WireGuard backend; pings are real `ping` runs redirected to 127.0.0.1, since mesh IPs are not routed here
(and tests must not send anything anywhere else).
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import RunningBroker, start_mosquitto
from harness import MESH, REGISTRAR_PASSWORD, REPO, Mesh, Registrar, agent_settings
from polling import wait_for

from meshcontract.localapi import LocalRequest, query
from nodeagent import meshctl
from nodeagent.agent import Agent
from nodeagent.ping import SystemPinger
from wgctl.memory import InMemoryRoutes, InMemoryWireGuard


class LoopbackPinger:
    """Runs the real system ping, but at 127.0.0.1; remembers which mesh IP was asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def ping(self, ip: str, *, count: int) -> list[float | None]:
        self.asked.append(ip)
        return SystemPinger().ping("127.0.0.1", count=count)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="mvpn", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """These cases need one broker only: Mosquitto (with its accounts managed by the registrar)."""
    running = start_mosquitto(tmp_path, users={"registrar": REGISTRAR_PASSWORD}, mesh=MESH)
    try:
        yield running
    finally:
        running.stop()


def test_meshctl_status_and_ping(
    tmp_path: Path,
    short_dir: Path,
    broker: RunningBroker,
    registrar: Registrar,
    capsys: pytest.CaptureFixture,
) -> None:
    mesh = Mesh(tmp_path, registrar)
    try:
        mesh.add("beta")
        wireguard = InMemoryWireGuard()
        sock = short_dir / "agent.sock"
        settings = agent_settings(
            tmp_path / "alpha", broker.url, registrar_url=registrar.http_url, join_token=mesh.token, name="alpha",
            endpoint="127.0.0.1:52000",
            socket_path=sock,
        )
        pinger = LoopbackPinger()
        alpha = Agent(settings, wireguard=wireguard, routes=InMemoryRoutes(wireguard), pinger=pinger)
        alpha.start()
        try:
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600, "root-only socket by default"
            beta = mesh.nodes["beta"].agent
            assert beta is not None
            wait_for(
                lambda: beta.public_key in wireguard.read("meshvpn0").peers, timeout=15, what="alpha has beta"
            )
            wireguard.simulate_handshake(
                "meshvpn0", beta.public_key, at=alpha.status().now - 3, rx_bytes=4096
            )

            assert meshctl.main(["--socket", str(sock), "status"]) == 0
            text = capsys.readouterr().out
            assert f"alpha ({alpha.node_id})" in text and f"{alpha.mesh_ip}/16 on meshvpn0" in text
            assert "broker     connected" in text and "registrar  online" in text
            assert f"membership revision {alpha.status().membership_revision}, complete" in text
            row = next(line for line in text.splitlines() if line.startswith("beta"))
            assert row.split()[:5] == ["beta", beta.mesh_ip, "active", "3s", "ago"]
            assert "127.0.0.1:51000" in row and "4.0 KiB" in row

            assert meshctl.main(["--socket", str(sock), "status", "--json"]) == 0
            data = json.loads(capsys.readouterr().out)
            assert data["membership_complete"] is True
            assert [(p["name"], p["configured"]) for p in data["peers"]] == [("beta", True)]

            assert meshctl.main(["--socket", str(sock), "ping", "beta", "-c", "2"]) == 0
            out = capsys.readouterr().out
            assert f"PING beta ({beta.mesh_ip})" in out and "2 received" in out
            assert pinger.asked == [beta.mesh_ip], "the ping went to the peer's mesh IP"

            assert meshctl.main(["ping", "beta", "-c", "1", "--json", "--socket", str(sock)]) == 0
            data = json.loads(capsys.readouterr().out)
            assert (data["target"], data["mesh_ip"], len(data["rtts_ms"])) == ("beta", beta.mesh_ip, 1)

            assert meshctl.main(["--socket", str(sock), "ping", "nobody"]) == 1
            assert "no mesh member named" in capsys.readouterr().err
        finally:
            alpha.stop()
        assert not sock.exists(), "the socket is removed on stop"
        assert meshctl.main(["--socket", str(sock), "status"]) == meshctl.EXIT_NOT_RUNNING
        assert f"the agent is not running at {sock}" in capsys.readouterr().err
    finally:
        mesh.close()


def meshctl_as(uid: int, *args: str) -> subprocess.CompletedProcess:
    """`meshctl ARGS` in a process of its own running as `uid` (and its group), in no other group. It keeps
    CAP_DAC_READ_SEARCH, only so that it can load Python from under /root; connecting to the socket still needs
    the socket's own permissions, and the agent sees `uid`."""
    wrap = [
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--",
    ]  # fmt: skip
    code = "import sys; from nodeagent import meshctl; sys.exit(meshctl.main(sys.argv[1:]))"
    return subprocess.run(
        [*wrap, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
    )  # fmt: skip


def test_the_sockets_group_may_read_but_not_rotate_the_key(
    tmp_path: Path, short_dir: Path, broker: RunningBroker, registrar: Registrar
) -> None:
    """A desktop user given the socket for the chat (socket_mode 0660, socket_group) reads the status but may not
    change the node: the agent asks the kernel who is calling (SO_PEERCRED), whatever the socket lets through."""
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (runs meshctl as another user)"
    elif shutil.which("setpriv") is None:
        reason = "setpriv (util-linux) not installed"
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    user = 65534
    group = grp.getgrgid(user).gr_name
    os.chmod(short_dir, 0o755)  # like /run/meshvpn
    sock = short_dir / "agent.sock"
    mesh = Mesh(tmp_path, registrar)
    settings = agent_settings(
        tmp_path / "alpha", broker.url, registrar_url=registrar.http_url, join_token=mesh.token, name="alpha",
        socket_path=sock, socket_mode=0o660, socket_group=group,
    )  # fmt: skip
    wireguard = InMemoryWireGuard()
    alpha = Agent(settings, wireguard=wireguard, routes=InMemoryRoutes(wireguard))
    alpha.start()
    try:
        wait_for(lambda: alpha.status().ready, timeout=20, what="alpha registered")
        before = alpha.public_key

        status = meshctl_as(user, "--socket", str(sock), "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["node_id"] == alpha.node_id

        refused = meshctl_as(user, "--socket", str(sock), "rotate-key")
        assert refused.returncode == 1, (refused.stdout, refused.stderr)
        assert "rotate-key changes this node: only root or the agent's own user" in refused.stderr
        assert f"you are uid {user}" in refused.stderr
        assert alpha.public_key == before and wireguard.read("meshvpn0").public_key == before

        # The same request from root over the same socket is carried out: the caller decided, nothing else.
        rotated = query(LocalRequest(op="rotate-key"), socket_path=str(sock), timeout=20)
        assert rotated.ok and rotated.rotated is not None, rotated.error
        assert rotated.rotated.previous_public_key == before and alpha.public_key != before
    finally:
        alpha.stop()
        mesh.close()


def _agent_cmd(registrar: Registrar, state: Path, sock: Path, token: str) -> list[str]:
    return [
        sys.executable, "-m", "nodeagent", "run", "--backend", "memory", "--registrar", registrar.http_url,
        "--mesh", MESH, "--join-token", token, "--name", "cli-node", "--state-dir", str(state), "--socket", str(sock),
        "--endpoint", "127.0.0.1:52999",
    ]  # fmt: skip


def test_agent_process_runs_and_stops_gracefully(
    tmp_path: Path, short_dir: Path, broker: RunningBroker, registrar: Registrar
) -> None:
    sock = short_dir / "agent.sock"
    state = tmp_path / "cli-state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _agent_cmd(registrar, state, sock, registrar.create_token()),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:

        def registered() -> bool:
            assert proc.poll() is None, log_path.read_text()
            if not sock.exists():
                return False
            status = query(LocalRequest(op="status"), socket_path=str(sock), timeout=5).status
            return status is not None and status.ready

        wait_for(registered, timeout=20, what="the agent process registers on the broker")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert "published status offline" in output and "agent stopped" in output
    for name in ("private.key", "broker_password"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    for name in ("node_id", "epoch", "registration.json"):
        assert (state / name).exists()


def test_agent_process_exits_3_when_refused(tmp_path: Path, short_dir: Path, broker: RunningBroker,
                                            registrar: Registrar) -> None:  # fmt: skip
    wrong = "mvj_not-the-right-secret-000." + registrar.create_token().rsplit(".", 1)[1]
    started = time.monotonic()
    done = subprocess.run(
        _agent_cmd(registrar, tmp_path / "state", short_dir / "agent.sock", wrong),
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "enrollment refused (invalid_token)" in done.stderr
    assert time.monotonic() - started < 30, "a refusal ends the agent at once, not after retries"
    assert not (tmp_path / "state" / "enrollment.json").exists() and not (short_dir / "agent.sock").exists()
