"""`meshvpn-registrar` end to end: tokens and credentials commands, `run --embedded-broker` where a node logs
in with its join token, registers, receives its own broker password and logs in with that, and a SIGTERM that
stops the registrar with its embedded broker quickly and cleanly."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from brokers import free_port
from polling import wait_for

from meshcontract import access, messages, topics
from meshcontract.messages import RegisterReply, RegistrarStatus
from meshcontract.settings import load_settings
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings, make_client
from registrar import cli
from registrar.settings import RegistrarSettings

MESH = "clilab"
REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out.strip()


def test_tokens_commands(tmp_path, capsys):
    d = str(tmp_path)
    code, secret = run_cli(capsys, "tokens", "create", "--state-dir", d, "--ttl", "60", "--uses", "3")
    assert code == 0 and secret.startswith("mvj_")
    code, listing = run_cli(capsys, "tokens", "list", "--state-dir", d)
    token_id = listing.splitlines()[1].split()[0]
    assert code == 0 and "yes" in listing and "0/3" in listing and secret not in listing
    assert run_cli(capsys, "tokens", "revoke", token_id, "--state-dir", d)[0] == 0
    assert run_cli(capsys, "tokens", "revoke", token_id, "--state-dir", d)[0] == 1
    code, password = run_cli(capsys, "credentials", "issue", "observer", "--state-dir", d)
    entries = access.parse_password_file((tmp_path / "passwords").read_text())
    assert code == 0 and access.verify_password(password, entries["observer"])
    assert run_cli(capsys, "credentials", "issue", "Not A User", "--state-dir", d)[0] == 2


class Client:
    def __init__(self, port: int, user: str, password: str, *, will: bool = False) -> None:
        self.connack: list[object] = []
        self.messages: list[tuple[str, bytes]] = []
        self.client = make_client(
            BrokerSettings(url=f"mqtt://127.0.0.1:{port}", username=user, password=password, keepalive_s=5),
            client_id=user,
        )
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.append(rc)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(lambda: self.connack, what=f"CONNACK for {user}")

    def subscribe(self, *filters: str) -> None:
        """Subscribe with QoS 1 and return once the broker acknowledged it."""
        acked = threading.Event()
        self.client.on_subscribe = lambda *_: acked.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert acked.wait(10), f"no SUBACK for {filters}"

    @property
    def accepted(self) -> bool:
        return not self.connack[-1].is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def running(tmp_path, capsys):
    state = tmp_path / "state"
    code, token = run_cli(capsys, "tokens", "create", "--state-dir", str(state))
    assert code == 0
    broker_port, http_port = free_port(), free_port()
    settings = load_settings(
        RegistrarSettings,
        environ={},
        overrides={
            "state_dir": str(state),
            "embedded_broker": True,
            "broker_listen": f"127.0.0.1:{broker_port}",
            "http_listen": f"127.0.0.1:{http_port}",
            "mesh": MESH,
            "network": "10.66.0.0/24",
            "heartbeat_interval_s": 0.3,
            "heartbeat_ttl_s": 1.0,
        },
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            cli.run(settings, stop=stop)
        except BaseException as exc:  # surfaced by the test, not swallowed
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{http_port}"

    def healthy() -> bool:
        if errors:
            raise errors[0]
        try:
            return httpx.get(f"{base}/healthz", timeout=1).json()["ready"]
        except httpx.HTTPError:
            return False

    wait_for(healthy, what="registrar serving")
    try:
        yield {"token": token, "broker_port": broker_port, "base": base, "state": state, "stop": stop}
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "registrar did not stop"
        assert not errors, errors


def test_join_with_token_gets_own_credentials(running, capsys):
    port, token = running["broker_port"], running["token"]
    node = Client(port, "n1", access.JOIN_PASSWORD_PREFIX + token)
    assert node.accepted, "a valid join token must open the broker"
    node.subscribe(topics.build(MESH, Kind.REPLY, "n1"))  # before the request: the reply is not retained
    request = {
        "request_id": "cli-request-1",
        "node_id": "n1",
        "name": "first",
        "public_key": base64.b64encode(b"\x05" * 32).decode(),
        "listen_port": 51820,
        "join_token": token,
        "epoch": 1,
    }
    node.client.publish(topics.build(MESH, Kind.REGISTER, "n1"), json.dumps(request), qos=1)
    wait_for(lambda: node.messages, what="registration reply")
    reply = messages.decode(RegisterReply, node.messages[0][1])
    assert reply.ok and reply.mesh_ip == "10.66.0.1" and reply.broker_password
    node.close()
    # its own password works now; the single-use token no longer does, for anyone
    again = Client(port, "n1", reply.broker_password)
    assert again.accepted
    again.close()
    other = Client(port, "n2", access.JOIN_PASSWORD_PREFIX + token)
    assert not other.accepted
    other.client.loop_stop()
    # a valid reusable token never lets anyone log in as a node that already has credentials
    code, reusable = run_cli(capsys, "tokens", "create", "--reusable", "--state-dir", str(running["state"]))
    assert code == 0
    impostor = Client(port, "n1", access.JOIN_PASSWORD_PREFIX + reusable)
    assert not impostor.accepted
    impostor.client.loop_stop()
    newcomer = Client(port, "n3", access.JOIN_PASSWORD_PREFIX + reusable)
    assert newcomer.accepted
    newcomer.close()
    # the HTTP API shows it; admin endpoints need the generated admin token
    base = running["base"]
    assert httpx.get(f"{base}/v1/nodes/n1").json()["mesh_ip"] == "10.66.0.1"
    admin = (running["state"] / "admin_token").read_text().strip()
    assert httpx.get(f"{base}/v1/tokens").status_code == 401
    assert httpx.get(f"{base}/v1/tokens", headers={"Authorization": f"Bearer {admin}"}).json()[0]["uses"] == 1


def test_graceful_stop_publishes_offline(running, capsys):
    code, password = run_cli(capsys, "credentials", "issue", "observer", "--state-dir", str(running["state"]))
    assert code == 0
    obs = Client(running["broker_port"], "observer", password)
    assert obs.accepted
    obs.subscribe(topics.build(MESH, Kind.REGISTRAR))

    def last_state() -> str | None:
        payloads = [p for t, p in obs.messages if p]
        return messages.decode(RegistrarStatus, payloads[-1]).state if payloads else None

    wait_for(lambda: last_state() == "online", what="registrar online (retained)")
    running["stop"].set()
    wait_for(
        lambda: last_state() == "offline" or not obs.client.is_connected(), what="offline or broker gone"
    )
    # the embedded broker stops with the registrar; the offline status was published before it did
    assert last_state() == "offline"
    obs.client.loop_stop()


def test_sigterm_with_embedded_broker_stops_fast_and_clean(tmp_path, capsys):
    """Issue 13: SIGTERM of `registrar run --embedded-broker` with clients connected exits 0 within a second or so,
    without a traceback. Clients subscribed with QoS 1 acknowledge the registrar's offline status while the
    broker shuts down, which is when amqtt's connection stop used to hang (docs/broker.md, fix 5)."""
    state = tmp_path / "state"
    passwords = {}
    for user in ("observer", "n1", "n2"):
        code, passwords[user] = run_cli(capsys, "credentials", "issue", user, "--state-dir", str(state))
        assert code == 0
    broker_port, http_port = free_port(), free_port()
    log_path = tmp_path / "registrar.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "registrar", "run", "--embedded-broker",
                "--broker-listen", f"127.0.0.1:{broker_port}", "--http", f"127.0.0.1:{http_port}",
                "--state-dir", str(state), "--mesh", MESH, "--heartbeat-interval", "0.3", "--heartbeat-ttl", "1",
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    clients: list[Client] = []

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).json()["ready"]
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=30, what="registrar ready (/healthz)")
        for user, password in passwords.items():
            client = Client(broker_port, user, password)
            clients.append(client)
            assert client.accepted
            client.subscribe(topics.build(MESH, Kind.REGISTRAR), topics.subscription(MESH, Kind.MEMBERS))
        wait_for(lambda: all(any(p for _, p in c.messages) for c in clients), what="every client got the status")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        stop_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for client in clients:
            client.client.loop_stop()
    output = log_path.read_text()
    with capsys.disabled():
        print(f"\nregistrar with embedded broker: SIGTERM to exit {stop_s:.2f} s")
    assert code == 0, output
    assert "Traceback" not in output, output
    assert stop_s < 5.0, output
