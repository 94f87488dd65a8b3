"""The integration harness: a registrar subprocess, in-process agents on in-memory WireGuard, and the mesh.

    reg = Registrar(broker, tmp_path / "registrar"); reg.start()
    mesh = Mesh(tmp_path, broker, reg)
    mesh.add("alpha"); mesh.add("beta"); mesh.wait_complete()
    mesh.crash("beta")            # like SIGKILL (tests/faults.py), no goodbye
    mesh.node("alpha").faults.pause_heartbeats()

The registrar runs as `python -m registrar run` so it can be killed and restarted; readiness is its /healthz
(over HTTPS, verified against its CA). It manages the broker's accounts as in production: Mosquitto's through
the dynamic security plugin, the embedded broker's (standalone or in the registrar) through its password file.
Agents enroll over HTTPS with a join token exactly as real ones do.
Each Node is one machine: its agent (replaced on restart), its 'kernel' (an InMemoryWireGuard that survives an
agent crash or restart) and its state dir. Short heartbeat/TTL settings keep every case within seconds.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from brokers import EmbeddedBrokerProcess, MosquittoBroker, RunningBroker, free_port
from faults import Faults
from polling import wait_for

from meshcontract.transport import BrokerSettings
from nodeagent.agent import Agent
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Enrollment, StateStore
from nodeagent.underlay import InMemoryAddresses, Reflector
from wgctl.memory import InMemoryRoutes, InMemoryWireGuard

MESH = "itmesh"
IFNAME = "meshvpn0"
HEARTBEAT_S = 0.5
TTL_S = 2.0
RECONCILE_S = 0.5
REPO = Path(__file__).resolve().parents[1]
REGISTRAR_PASSWORD = "registrar-test-password"  # the registrar's broker account on the test brokers


def agent_settings(state_dir: Path, broker_url: str, **overrides: Any) -> AgentSettings:
    """AgentSettings for a test agent: this harness's mesh, a loopback endpoint, quick reconcile and timeouts."""
    values: dict[str, Any] = {
        "broker": BrokerSettings(url=broker_url, keepalive_s=2),
        "mesh": MESH,
        "endpoint": "127.0.0.1:51820",
        "state_dir": state_dir,
        "reconcile_interval_s": RECONCILE_S,
        "register_timeout_s": 2,
    }
    values.update(overrides)
    return AgentSettings(**values)


def pre_enroll(state_dir: Path, *, signing_key: str, mesh: str = MESH) -> str:
    """Leave `state_dir` as enrolling would (identity, own password, whom to trust), without a registrar: for
    agents driven by a test that plays the registrar's publishing side. Returns the node id."""
    store = StateStore(state_dir)
    store.ensure_dir()
    node_id = store.node_id()
    store.own_broker_password()
    enrollment = Enrollment(
        mesh=mesh, node_id=node_id, registrar_url="https://127.0.0.1:9", signing_key=signing_key, ca_pin="-" * 43
    )
    store.save_enrollment(enrollment, ca_pem="")
    return node_id


class Registrar:
    """`python -m registrar run` against `broker` (or with its embedded broker), state in `state_dir`; restartable."""

    def __init__(self, broker: RunningBroker | None, state_dir: Path, *, embedded_port: int | None = None) -> None:
        self.broker = broker
        self.embedded_port = embedded_port
        self.state_dir = state_dir
        self.log_path = state_dir.parent / "registrar.log"
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.env = {
            **os.environ,
            "MESHVPN_STATE_DIR": str(state_dir),
            "MESHVPN_MESH": MESH,
            "PYTHONPATH": str(REPO),
        }
        if isinstance(broker, MosquittoBroker):
            self.env["MESHVPN_BROKER__PASSWORD"] = REGISTRAR_PASSWORD
            self.env["MESHVPN_BROKER_ADMIN_PASSWORD"] = broker.admin_password
            self.env["MESHVPN_BROKER_ACCOUNTS"] = "dynsec"
        elif isinstance(broker, EmbeddedBrokerProcess):
            self.env["MESHVPN_BROKER__PASSWORD"] = REGISTRAR_PASSWORD
            self.env["MESHVPN_BROKER_ACCOUNTS"] = "password_file"
            self.env["MESHVPN_PASSWORD_FILE"] = str(broker.password_file)

    @property
    def http_url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    @property
    def broker_url(self) -> str:
        """Where agents reach the broker (the embedded one speaks TLS, the test brokers plain TCP on loopback)."""
        if self.embedded_port is not None:
            return f"mqtts://127.0.0.1:{self.embedded_port}"
        assert self.broker is not None
        return self.broker.url

    def cli(self, *args: str) -> str:
        """Run a `meshvpn-registrar` command on this registrar (its admin socket); its stdout."""
        done = subprocess.run(
            [sys.executable, "-m", "registrar", *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"registrar {args} failed: {done.stderr}"
        return done.stdout.strip()

    def create_token(self, *, reusable: bool = True) -> str:
        return self.cli("tokens", "create", *(["--reusable"] if reusable else [])).splitlines()[-1].strip()

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "registrar", "run",
                    *self._broker_args(),
                    "--state-dir", str(self.state_dir),
                    "--mesh", MESH,
                    "--heartbeat-interval", str(HEARTBEAT_S),
                    "--heartbeat-ttl", str(TTL_S),
                    "--http", f"127.0.0.1:{self.http_port}",
                    "--tls-name", "127.0.0.1",
                ],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for(self.ready, timeout=30, what="registrar ready (/healthz)")

    def tls(self) -> ssl.SSLContext:
        """TLS that trusts this registrar's CA (written at its first start), as an enrolled agent does."""
        context = ssl.create_default_context(cafile=str(self.state_dir / "ca.pem"))
        context.check_hostname = False
        return context

    def ready(self) -> bool:
        """True once /healthz says the registrar is connected and subscribed; AssertionError if it died."""
        assert self.proc is not None and self.proc.poll() is None, f"registrar exited:\n{self.log()}"
        if not (self.state_dir / "ca.pem").exists():
            return False
        try:
            return bool(httpx.get(f"{self.http_url}/healthz", timeout=1, verify=self.tls()).json()["ready"])
        except httpx.HTTPError:
            return False

    def admin_token(self) -> str:
        return (self.state_dir / "admin_token").read_text().strip()

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An admin request to the HTTP API (bearer token)."""
        headers = {"Authorization": f"Bearer {self.admin_token()}"}
        return httpx.request(method, f"{self.http_url}{path}", headers=headers, verify=self.tls(), timeout=10, **kwargs)

    def nodes(self) -> list[dict[str, Any]]:
        """GET /v1/nodes: every member as the registrar holds it."""
        return self.api("GET", "/v1/nodes").json()

    def _broker_args(self) -> list[str]:
        if self.embedded_port is not None:
            return ["--embedded-broker", "--broker-listen", f"127.0.0.1:{self.embedded_port}"]
        assert self.broker is not None
        return ["--broker", self.broker.url]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Node:
    """One machine: its agent (replaced on restart), its 'kernel' (in-memory WireGuard) and its state dir.

    `dark`: its data plane is cut (nothing reaches it over the mesh) while its agent may still run.
    """

    name: str
    settings: AgentSettings
    wireguard: InMemoryWireGuard
    routes: InMemoryRoutes
    agent: Agent | None = None
    faults: Faults = field(default_factory=Faults)
    dark: bool = False
    # Its interface addresses: none by default (the configured endpoint is all it advertises), not the addresses
    # of the machine the tests run on.
    addresses: InMemoryAddresses = field(default_factory=InMemoryAddresses)
    reflector: Reflector | None = None  # None: the registrar's GET /v1/reflect (127.0.0.1: never advertised)

    def peers(self) -> dict[str, tuple[str, ...]]:
        """public key -> allowed IPs on this machine's interface now."""
        return {k: p.allowed_ips for k, p in self.wireguard.read(IFNAME).peers.items()}

    @property
    def running(self) -> Agent:
        assert self.agent is not None, f"{self.name} is not running"
        return self.agent


class MeshPinger:
    """The agents' pinger: a mesh IP answers while its node's agent runs and its data plane is not `dark` (a
    crashed agent's node does not answer: the in-memory 'kernel' has no real tunnel behind it)."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    def ping(self, ip: str, *, count: int) -> list[float | None]:
        alive = any(
            n.agent is not None and not n.dark and n.agent.mesh_ip == ip for n in list(self._mesh.nodes.values())
        )
        return [0.1 if alive else None] * count


class Mesh:
    """Start, stop, crash and restart agents that enroll with `registrar`; check the mesh as a whole."""

    def __init__(self, tmp_path: Path, registrar: Registrar, token: str | None = None) -> None:
        self.tmp_path = tmp_path
        self.registrar = registrar
        self.broker_url = registrar.broker_url
        self.token = token if token is not None else registrar.create_token()
        self.nodes: dict[str, Node] = {}
        self.pinger = MeshPinger(self)

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def add(self, name: str, *, reflector: Reflector | None = None, **overrides: Any) -> Node:
        wireguard = InMemoryWireGuard()
        settings = agent_settings(
            self.tmp_path / "nodes" / name,
            self.broker_url,
            **{
                "registrar_url": self.registrar.http_url,
                "join_token": self.token,
                "name": name,
                "endpoint": f"127.0.0.1:{51000 + len(self.nodes)}",
                **overrides,
            },
        )
        node = Node(name, settings, wireguard, InMemoryRoutes(wireguard), reflector=reflector)
        self.nodes[name] = node
        self.start(name)
        return node

    def start(self, name: str, *, fresh_kernel: bool = False) -> Agent:
        node = self.nodes[name]
        if fresh_kernel:  # a reboot: the interface and its peers are gone
            node.wireguard = InMemoryWireGuard()
            node.routes = InMemoryRoutes(node.wireguard)
        node.faults = Faults()
        node.agent = Agent(
            node.settings,
            wireguard=node.wireguard,
            routes=node.routes,
            pinger=self.pinger,
            local_api=False,
            client_factory=node.faults.factory,
            addresses=node.addresses,
            reflector=node.reflector,
        )
        node.agent.start()
        return node.agent

    def running(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.agent is not None]

    def stop(self, name: str) -> None:
        self.nodes[name].running.stop()
        self.nodes[name].agent = None

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.faults.crash(node.running)
        node.agent = None

    def expected_peers(self, node: Node, members: list[Node]) -> dict[str, tuple[str, ...]]:
        return {
            m.running.public_key: (f"{m.running.mesh_ip}/32",)
            for m in members
            if m is not node and m.agent is not None and m.agent.mesh_ip is not None
        }

    def is_complete(self) -> bool:
        """Symmetric full mesh: every running agent has exactly every other running agent as its peer."""
        running = self.running()
        if any(n.running.mesh_ip is None for n in running):
            return False
        return all(n.peers() == self.expected_peers(n, running) for n in running)

    def wait_complete(self, timeout: float = 20) -> None:
        wait_for(self.is_complete, timeout=timeout, what=f"full mesh of {[n.name for n in self.running()]}")

    def snapshot(self) -> dict[str, dict[str, tuple[str, ...]]]:
        return {n.name: n.peers() for n in self.nodes.values()}

    def reconciled_more(self, passes: int = 2):
        """A condition: every running agent completed `passes` more reconcile passes than now."""
        before = {n.name: n.running.reconcile_count for n in self.running()}
        return lambda: all(n.running.reconcile_count >= before[n.name] + passes for n in self.running())

    def peers_removed(self) -> int:
        """Peers removed so far by the running agents (their own counters, not their logs)."""
        return sum(n.running.status().counters.get("peer_removed", 0) for n in self.running())

    def close(self) -> None:
        for node in self.nodes.values():
            if node.agent is not None:
                node.agent.stop()
                node.agent = None
