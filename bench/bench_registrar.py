"""How the registrar copes with a big mesh: a join storm, churn in a steady mesh, heartbeats of 10,000 members.

    python bench/bench_registrar.py [--mode storm|churn|heartbeats] [--nodes 1000] [--broker mosquitto|amqtt|both]
                                    [--workers 4] [--heartbeat-interval 1] [--heartbeat-window 20]
                                    [--heartbeat-ttl 60] [--rounds 5] [--sample K] [--keep] [--json FILE]

For each broker: start it with access control as shipped, on a random 127.0.0.1 port in plain TCP (Mosquitto
with the dynamic security plugin, whose node accounts the registrar creates through its admin; or the embedded
amqtt broker as `python -m broker` reading the password file the registrar writes), and the registrar as a
subprocess (`python -m registrar run`, fresh state dir, SQLite WAL).

--mode storm (the default):

1. Enrollment. N nodes enroll with one reusable join token, each with its own broker password, through the
   registrar's admin socket: the same HTTP API, without the per-address allowance that one benchmarking host
   would exhaust after ten. The registrar creates each node's broker account before it commits the admission.
2. N simulated agents run in a few worker processes, each driving its paho clients from one selector loop
   (paho's external-loop API, TCP_NODELAY like every component). Each logs in as itself with its own password,
   subscribes like an agent (reply/<self>, delta, registrar, and the retained snapshot until it holds one, then
   unsubscribes; QoS 1) and heartbeats from then on. The run goes on once every node holds the registrar's
   retained status online and a membership with all N members.
3. The burst: all N publish a RegisterRequest at once, with an endpoint other than the one they enrolled with
   (a fleet coming up on its real addresses), so every registration changes a record. Measured: until the
   registrar has committed all N (its `registrations` counter, read over /metrics), until every node has its ok
   reply, and until every node's membership shows all N at their new endpoint. Nodes follow the stream as the
   agent does (nodeagent.membership): a delta that starts at the revision held is applied, an older one ignored,
   one from further ahead is a gap that makes the node fetch the snapshot again. That last measure is N x N
   record deliveries, the cost of a full mesh. An unanswered request is sent again after 10 s, like an agent.
   Each node counts the stream messages (delta, snapshot) it receives from the burst until it is complete, and
   their bytes (topic + payload). One observer, subscribed to the per-member retained records (members/+) that
   the registrar still publishes for observers, counts what the old protocol sent every agent: one message per
   changed member (the old protocol also sent a roster of all N per batch, computed by `old_protocol`).
4. Heartbeats: after convergence, the registrar's CPU (utime + stime from /proc) and RSS over
   --heartbeat-window s while every node heartbeats every --heartbeat-interval s.

--mode churn: a steady mesh of N members, seeded (the registrar's database and the broker's accounts written
before either starts: enrolling 1,000 through Mosquitto's dynamic security takes half a minute and is the storm's
business), N simulated agents as above in sync. Then --rounds times: one new node enrolls over the admin socket
(a join) and, 1 s later, one simulated agent says goodbye (an offline status: a leave, unreachable at once).
Measured per agent: from the enrollment call, or the goodbye's publish, until the agent's membership shows it; p50/p95/max.
With --sample K, K members spread evenly over the mesh are such agents (the timed ones; the leavers are among them)
and the other N-K are the heartbeats mode's light nodes: every member still a live, heartbeating, subscribed client,
so each delta goes to N subscribers and the registrar hears N heartbeats, but 10,000 fit on two cores. Also measured:
how long each join's enrollment call took, the registrar's and the broker's CPU and RSS over the rounds, and how
many light nodes the broker disconnected.

--mode heartbeats: N members, seeded, and N light simulated nodes: raw MQTT 3.1.1 over one socket each, many per
worker process, that log in as themselves, subscribe like an agent (delta, registrar, reply/<self>; QoS 0,
received bytes discarded) and publish a heartbeat every --heartbeat-interval s, spread evenly over the interval;
they parse nothing, so that 10,000 fit on two cores. Measured over --heartbeat-window s: heartbeats sent and
received by the registrar per second (its `messages` counter: received < sent means the broker or the
registrar fell behind), the registrar's and the broker's CPU and RSS.

The simulated members (full agents and light nodes) are in bench/registrar_nodes.py.

Each run prints one JSON line of figures (`summarize`, `summarize_churn`, `summarize_heartbeats`), and --json
FILE writes them too: an object for one broker, a list of them with --broker both. Every mode has the keys
nodes, broker, full_roster_s (storm: every node holds all N at their new endpoint), registrations_per_s (storm:
committed), registrar_cpu_pct and registrar_rss_mb (heartbeats, churn; RSS in MiB), None where the mode does not
measure it; and the load average of the machine at the end (loadavg_1m), which other work shares.

Every worker checks the registrar's signature (from the enrollment reply, or with a seeded mesh from the state
dir) on the first snapshot and the first delta it receives; everything else is parsed lightly, so that the
bench measures the registrar and the broker rather than the simulated agents. --heartbeat-ttl is long by
default so that nodes enrolled first do not expire while the rest enroll and connect. The bench raises its
open-file limit to the hard limit (one socket per simulated node, in the broker too: 10,000 nodes need more
than the usual 1,024).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# This checkout's packages, here and in every subprocess (registrar, embedded broker), before any installed copy.
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from brokers import free_port, start_embedded, start_mosquitto  # noqa: E402
from registrar_nodes import (  # noqa: E402, F401 (mqtt_*: tested through this module)
    MESH,
    REGISTERED_HOST,
    light_worker,
    mqtt_connect,
    mqtt_publish,
    mqtt_subscribe,
    node_id,
    node_key,
    node_password,
    worker,
)

from meshcontract import access, jointoken, topics  # noqa: E402
from meshcontract.messages import Endpoint, EnrollRequest, MemberState  # noqa: E402
from meshcontract.signing import Signer  # noqa: E402
from meshcontract.topics import Kind  # noqa: E402
from meshcontract.transport import BrokerSettings, make_client  # noqa: E402
from registrar.engine import Delta  # noqa: E402
from registrar.membership import Member  # noqa: E402
from registrar.store import SqliteStore  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
REGISTRAR_PASSWORD = "bench-registrar-password"
OBSERVER_PASSWORD = "bench-observer-password"
NETWORK = "100.96.0.0/16"
ENROLLED_HOST = "192.0.2.1"  # the endpoint each node enrolls with (and registers at another in the storm)


# ---- the registrar, the broker, their numbers --------------------------------------------------------------


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    """(utime + stime in seconds, RSS in KiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return cpu, rss


def metric(admin: httpx.Client, name: str) -> int:
    """One of the registrar's counters (meshvpn_registrar_<name>), from /metrics."""
    for line in admin.get("/metrics").text.splitlines():
        if line.startswith(f"meshvpn_registrar_{name} "):
            return int(float(line.split()[1]))
    raise RuntimeError(f"no {name} counter in /metrics")


def new_token(admin: httpx.Client) -> str:
    created = admin.post("/v1/tokens", json={"reusable": True})
    created.raise_for_status()
    return jointoken.parse(created.json()["token"]).secret


def enroll(admin: httpx.Client, index: int, secret: str) -> str:
    """Enroll node `index` with the join token `secret`; returns the registrar's signing key from the reply."""
    request = EnrollRequest(
        node_id=node_id(index), name=node_id(index), public_key=node_key(index), listen_port=51820,
        endpoints=[{"host": ENROLLED_HOST, "port": 51820}], token=secret, password=node_password(index),
    )  # fmt: skip
    reply = admin.post("/v1/enroll", content=request.model_dump_json())
    if reply.status_code != 200:
        raise RuntimeError(f"enrolling {node_id(index)}: HTTP {reply.status_code} {reply.text}")
    return reply.json()["signing_key"]


def enroll_all(admin: httpx.Client, n: int) -> str:
    """Enroll nodes 0..n-1 with one reusable token; returns the registrar's signing key from the replies."""
    secret = new_token(admin)
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda index: enroll(admin, index, secret), range(n)))
    if len(keys) != 1:
        raise RuntimeError(f"the enrollment replies carry {len(keys)} different signing keys")
    return keys.pop()


def seed(state_dir: Path, n: int) -> None:
    """Write the registrar's database as if nodes 0..n-1 had enrolled and registered (epoch 1, at their
    registered endpoint): a steady mesh, without enrolling each through the broker's account admin."""
    now = time.time()
    network = ipaddress.IPv4Network(NETWORK)
    members = tuple(
        Member(
            node_id=node_id(i), name=node_id(i), public_key=node_key(i), mesh_ip=str(network.network_address + i + 1),
            endpoints=(Endpoint(host=REGISTERED_HOST, port=51820),), listen_port=51820, state=MemberState.ACTIVE,
            epoch=1, revision=i + 1, joined_at=now, updated_at=now, last_seen=now,
            password_hash=access.hash_password(node_password(i)),
        )  # fmt: skip
        for i in range(n)
    )
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = SqliteStore(state_dir / "registrar.db")
    try:
        store.commit(Delta(upsert_members=members, revision=n))
    finally:
        store.close()


def signing_key_of(state_dir: Path) -> str:
    """The registrar's public signing key, from its state dir."""
    return Signer.from_pem((state_dir / "signing.key").read_bytes()).public_key


def start_registrar(kind: str, broker, state: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, Path]:
    """`python -m registrar run` on `broker`, managing its node accounts as in production; (process, admin socket)."""
    env = {**os.environ, "MESHVPN_BROKER__PASSWORD": REGISTRAR_PASSWORD, "MESHVPN_LOG_LEVEL": "WARNING"}
    if kind == "mosquitto":
        env.update(MESHVPN_BROKER_ACCOUNTS="dynsec", MESHVPN_BROKER_ADMIN_PASSWORD=broker.admin_password)
    else:
        env.update(MESHVPN_BROKER_ACCOUNTS="password_file", MESHVPN_PASSWORD_FILE=str(broker.password_file))
    registrar = subprocess.Popen(
        [sys.executable, "-m", "registrar", "run", "--broker", broker.url, "--state-dir", str(state), "--mesh", MESH,
         "--network", NETWORK, "--heartbeat-interval", str(args.heartbeat_interval), "--heartbeat-ttl",
         str(max(args.heartbeat_ttl, 3 * args.heartbeat_interval)), "--http", f"127.0.0.1:{free_port()}",
         "--tls-name", "127.0.0.1"],
        env=env, cwd=REPO,
    )  # fmt: skip
    return registrar, state / "admin.sock"


def wait_ready(registrar: subprocess.Popen, admin: httpx.Client, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registrar.poll() is not None:
            raise RuntimeError(f"the registrar exited with {registrar.returncode}")
        try:
            if admin.get("/healthz").json()["ready"]:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the registrar was not ready within {timeout:.0f} s")


# ---- figures (pure) -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    """What one worker reports after a storm: done or partial, its nodes' latest times (monotonic clock), and the
    stream messages and bytes its nodes received from the storm's start until each was complete."""

    status: str  # "done": every node of the worker holds the full membership; "partial": the run timed out
    last_reply_at: float
    last_complete_at: float
    missing: int  # nodes without the full membership (partial only)
    signatures_checked: bool
    all_sent_at: float  # every request of the burst handed to the kernel (0: not yet)
    stream_messages: int = 0  # summed over the worker's nodes
    stream_bytes: int = 0
    max_stream_messages: int = 0  # of one node
    max_stream_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Measured:
    """The raw measurements of one storm, before `summarize` turns them into figures."""

    broker: str
    nodes: int
    enroll_s: float
    connected_s: float
    results: list[Result | None]  # one per worker; None: it did not answer in time
    t0: float  # the burst's start (monotonic clock)
    committed_s: float | None  # until the registrar had committed all N registrations; None: not in time
    burst_cpu_s: float
    burst_rss_kib: int
    heartbeat_interval_s: float
    heartbeat_window_s: float
    heartbeat_cpu_s: float
    heartbeat_rss_kib: int
    heartbeats_received: int = 0  # messages the registrar counted in the heartbeat window
    publishes: int = 0  # the registrar's membership publishes (delta + snapshot) during the burst
    observer_messages: int = 0  # per-member records (members/+) one observer received during the burst
    observer_bytes: int = 0
    loadavg: float = 0.0


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def old_roster_bytes(n: int) -> int:
    """The old protocol's roster message of n members (retained on roster, resent with every batch): its JSON
    as the old contract (meshcontract.messages.Roster before the stream) encoded it, plus its topic."""
    entries = ",".join(f'{{"node_id":"{node_id(i)}","revision":{n + i}}}' for i in range(n))
    body = f'{{"v":1,"mesh":"{MESH}","revision":{2 * n},"members":[{entries}],"published_at":1700000000.123456}}'
    return len(body) + len(f"meshvpn/v1/{MESH}/roster")


def old_protocol(nodes: int, record_messages: int, record_bytes: int, batches: int) -> dict:
    """Messages and bytes per agent the old protocol delivered for the same storm: every changed member's
    record (as an observer received them), and a roster of all N with each of the `batches` publishes."""
    return {
        "old_messages_per_agent": record_messages + batches,
        "old_bytes_per_agent": record_bytes + batches * old_roster_bytes(nodes),
    }


def summarize(m: Measured) -> dict:
    """The figures of one storm (what is printed and written by --json). Times are seconds from the burst's start;
    None where the run did not get that far. Pure."""
    results = [r for r in m.results if r is not None]
    complete = bool(m.results) and len(results) == len(m.results) and all(r.status == "done" for r in results)
    sent_s = max(r.all_sent_at for r in results) - m.t0 if complete else None
    reply_s = max(r.last_reply_at for r in results) - m.t0 if complete else None
    roster_s = max(r.last_complete_at for r in results) - m.t0 if complete else None
    committed = m.committed_s if m.committed_s else None
    messages = sum(r.stream_messages for r in results)
    stream_bytes = sum(r.stream_bytes for r in results)
    return {
        "mode": "storm",
        "broker": m.broker,
        "nodes": m.nodes,
        "enrolled_all_s": round(m.enroll_s, 2),
        "enrollments_per_s": round(m.nodes / m.enroll_s) if m.enroll_s > 0 else None,
        "connect_subscribe_sync_s": round(m.connected_s, 2),
        "all_complete": complete,
        "missing": 0 if complete else sum(r.missing for r in results),  # of the workers that answered
        "workers_without_answer": len(m.results) - len(results),
        "signatures_checked": complete and all(r.signatures_checked for r in results),
        "every_request_sent_s": _rounded(sent_s),
        "registrar_committed_all_s": _rounded(committed),
        "registrations_per_s": round(m.nodes / committed) if committed else None,
        "every_node_has_its_reply_s": _rounded(reply_s),
        "full_roster_s": _rounded(roster_s),
        "registrar_cpu_s_during_burst": round(m.burst_cpu_s, 2),
        "registrar_rss_mb_after_burst": round(m.burst_rss_kib / 1024, 1),
        "membership_publishes": m.publishes,
        "stream_messages_per_agent": round(messages / m.nodes, 1) if m.nodes else None,
        "stream_messages_max_agent": max((r.max_stream_messages for r in results), default=0),
        "stream_bytes_per_agent": round(stream_bytes / m.nodes) if m.nodes else None,
        "stream_bytes_max_agent": max((r.max_stream_bytes for r in results), default=0),
        "stream_bytes_all_agents": stream_bytes,
        "observer_record_messages": m.observer_messages,
        **old_protocol(m.nodes, m.observer_messages, m.observer_bytes, m.publishes),
        "heartbeats_per_s": round(m.nodes / m.heartbeat_interval_s),
        "heartbeats_received_per_s": round(m.heartbeats_received / m.heartbeat_window_s),
        "registrar_cpu_pct": round(100 * m.heartbeat_cpu_s / m.heartbeat_window_s, 1),
        "registrar_rss_mb": round(m.heartbeat_rss_kib / 1024, 1),
        "loadavg_1m": round(m.loadavg, 2),
    }


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of `values`, nearest rank; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def sample_split(n: int, k: int) -> tuple[list[int], list[int]]:
    """Members 0..n-1 as (full agents, light nodes): k agents spread evenly over the range, the rest light; every
    member an agent when k is 0 or at least n. Pure."""
    if k <= 0 or k >= n:
        return list(range(n)), []
    agents = [i * n // k for i in range(k)]
    chosen = set(agents)
    return agents, [i for i in range(n) if i not in chosen]


@dataclass(frozen=True, slots=True)
class ChurnMeasured:
    """Per round, how long after the join (or the goodbye) each agent showed it; None: an agent never did."""

    broker: str
    nodes: int
    connected_s: float
    joins: list[list[float] | None]
    leaves: list[list[float] | None]
    loadavg: float = 0.0
    agents: int = 0  # full simulated agents, the timed ones (0: all N); the other members are light nodes
    light_closed: int = 0  # light nodes' connections the broker closed by the end
    light_sent: int = 0  # heartbeats the light nodes sent over the window
    registrar_received: int = 0  # messages the registrar counted over the window (heartbeats of all, statuses)
    enroll_calls: tuple[float, ...] = ()  # how long each join's enrollment call took (account created, committed)
    window_s: float = 0.0  # from the first round's start to the last round's end
    registrar_cpu_s: float = 0.0  # over the window
    registrar_rss_kib: int = 0
    broker_cpu_s: float = 0.0
    broker_rss_kib: int = 0


def summarize_churn(m: ChurnMeasured) -> dict:
    """p50/p95/max over every agent of every round, in seconds; CPU in % of one core over the rounds. Pure."""

    def stats(rounds: list[list[float] | None], what: str) -> dict:
        samples = [t for r in rounds if r is not None for t in r]
        return {
            f"{what}_rounds": len(rounds),
            f"{what}_rounds_incomplete": sum(1 for r in rounds if r is None),
            f"{what}_samples": len(samples),
            f"{what}_p50_s": _rounded(percentile(samples, 50), 3),
            f"{what}_p95_s": _rounded(percentile(samples, 95), 3),
            f"{what}_max_s": _rounded(max(samples, default=None), 3),
        }

    def pct(cpu_s: float) -> float | None:
        return round(100 * cpu_s / m.window_s, 1) if m.window_s > 0 else None

    def mib(kib: int) -> float | None:
        return round(kib / 1024, 1) if m.window_s > 0 else None

    agents = m.agents or m.nodes
    return {
        "mode": "churn",
        "broker": m.broker,
        "nodes": m.nodes,
        "agents": agents,
        "light_nodes": m.nodes - agents,
        "light_connections_closed": m.light_closed,
        "connect_subscribe_sync_s": round(m.connected_s, 2),
        **stats(m.joins, "join"),
        "join_enroll_call_p50_s": _rounded(percentile(list(m.enroll_calls), 50), 3),
        "join_enroll_call_max_s": _rounded(max(m.enroll_calls, default=None), 3),
        **stats(m.leaves, "leave"),
        "full_roster_s": None,
        "registrations_per_s": None,
        "window_s": round(m.window_s, 1),
        "registrar_cpu_pct": pct(m.registrar_cpu_s),
        "registrar_rss_mb": mib(m.registrar_rss_kib),
        "broker_cpu_pct": pct(m.broker_cpu_s),
        "broker_rss_mb": mib(m.broker_rss_kib),
        "light_heartbeats_sent_per_s": round(m.light_sent / m.window_s) if m.window_s > 0 else None,
        "registrar_messages_per_s": round(m.registrar_received / m.window_s) if m.window_s > 0 else None,
        "loadavg_1m": round(m.loadavg, 2),
    }


@dataclass(frozen=True, slots=True)
class HeartbeatMeasured:
    """Counters and /proc samples at the start and the end of the heartbeat window."""

    broker: str
    nodes: int
    interval_s: float
    connected_s: float
    window_s: float
    sent: int  # heartbeats the light nodes sent in the window
    received: int  # messages the registrar counted in the window
    closed: int  # light nodes' connections the broker closed
    registrar_cpu_s: float
    registrar_rss_kib: int
    broker_cpu_s: float
    broker_rss_kib: int
    loadavg: float = 0.0


def summarize_heartbeats(m: HeartbeatMeasured) -> dict:
    """Rates per second and CPU in % of one core over the window. Pure."""
    return {
        "mode": "heartbeats",
        "broker": m.broker,
        "nodes": m.nodes,
        "heartbeat_interval_s": m.interval_s,
        "connect_subscribe_s": round(m.connected_s, 2),
        "window_s": m.window_s,
        "heartbeats_sent_per_s": round(m.sent / m.window_s),
        "heartbeats_received_per_s": round(m.received / m.window_s),
        "received_of_sent": round(m.received / m.sent, 3) if m.sent else None,
        "connections_closed": m.closed,
        "full_roster_s": None,
        "registrations_per_s": None,
        "registrar_cpu_pct": round(100 * m.registrar_cpu_s / m.window_s, 1),
        "registrar_rss_mb": round(m.registrar_rss_kib / 1024, 1),
        "broker_cpu_pct": round(100 * m.broker_cpu_s / m.window_s, 1),
        "broker_rss_mb": round(m.broker_rss_kib / 1024, 1),
        "loadavg_1m": round(m.loadavg, 2),
    }


# ---- runs ---------------------------------------------------------------------------------------------------


class Bench:
    """One run's broker, registrar and worker processes; `close()` stops them all and removes the files."""

    def __init__(self, kind: str, args: argparse.Namespace, *, seeded: int = 0) -> None:
        self.kind, self.args = kind, args
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-registrar-"))
        self.state = self.tmp / "state"
        self.procs: list = []
        self.pipes: list = []
        self.registrar: subprocess.Popen | None = None
        self.admin: httpx.Client | None = None
        users = {"registrar": REGISTRAR_PASSWORD, "observer": OBSERVER_PASSWORD}
        users.update({node_id(i): node_password(i) for i in range(seeded)})
        if seeded:
            seed(self.state, seeded)
        try:
            self.broker = (
                start_mosquitto(self.tmp, users=users, mesh=MESH) if kind == "mosquitto"
                else start_embedded(self.tmp, users=users, mesh=MESH)
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def start_registrar(self) -> httpx.Client:
        self.registrar, admin_socket = start_registrar(self.kind, self.broker, self.state, self.args)
        transport = httpx.HTTPTransport(uds=str(admin_socket))
        self.admin = httpx.Client(transport=transport, base_url="http://registrar", timeout=60)
        wait_ready(self.registrar, self.admin)
        return self.admin

    def spawn(self, target, args_of, members: list[int] | None = None) -> tuple[float, list]:
        """Start up to --workers processes running `target(*args_of(indices), pipe)` over `members` (default: all
        N); returns once all said "ready": (seconds it took, their pipes)."""
        t_start = time.monotonic()
        pipes = self.start(target, args_of, list(range(self.args.nodes)) if members is None else members)
        self.wait_ready(pipes)
        return time.monotonic() - t_start, pipes

    def start(self, target, args_of, members: list[int]) -> list:
        """Start up to --workers processes running `target(*args_of(indices), pipe)` over `members`; their pipes."""
        ctx = mp.get_context("fork")
        workers = min(self.args.workers, len(members))
        pipes = []
        for w in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(*args_of(members[w::workers]), child), daemon=True)
            proc.start()
            self.procs.append(proc)
            pipes.append(parent)
        self.pipes.extend(pipes)
        return pipes

    @staticmethod
    def wait_ready(pipes: list) -> None:
        for pipe in pipes:
            if not pipe.poll(600) or pipe.recv() != "ready":
                raise RuntimeError("a worker did not get its nodes connected, subscribed and in sync")

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send("stop")
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        if self.admin is not None:
            self.admin.close()
        if self.registrar is not None:
            self.registrar.terminate()
            try:
                self.registrar.wait(15)
            except subprocess.TimeoutExpired:
                self.registrar.kill()
        self.broker.stop()
        if self.args.keep:
            print(f"kept {self.tmp} (broker log and config, registrar state)", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class RecordObserver:
    """The observer account subscribed to every member's retained record (members/+), counting what arrives
    while `counting`: the per-member messages the old protocol sent every agent."""

    def __init__(self, port: int) -> None:
        self.counting = False
        self.messages = 0
        self.bytes = 0
        self.subscribed = threading.Event()
        settings = BrokerSettings(url=f"mqtt://127.0.0.1:{port}", username="observer", password=OBSERVER_PASSWORD)
        self.client = make_client(settings, client_id="observer")
        self.client.on_connect = lambda c, *a: c.subscribe(topics.subscription(MESH, Kind.MEMBERS), 1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not self.subscribed.wait(30):
            raise RuntimeError("the observer could not subscribe to members/+")

    def drain(self, quiet_s: float = 0.5, timeout: float = 10.0) -> None:
        """Stop counting once nothing arrived for `quiet_s`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.messages
            time.sleep(quiet_s)
            if self.messages == seen:
                break
        self.counting = False

    def _on_message(self, client, userdata, msg) -> None:
        # Not by the retain flag (the embedded broker keeps it set on live messages): the retained records the
        # subscription brought have arrived before counting starts.
        if self.counting:
            self.messages += 1
            self.bytes += len(msg.topic) + len(msg.payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_storm(kind: str, args: argparse.Namespace) -> dict:
    bench = Bench(kind, args)
    observer = None
    try:
        admin = bench.start_registrar()
        t_enroll = time.monotonic()
        signing_key = enroll_all(admin, args.nodes)
        enroll_s = time.monotonic() - t_enroll
        port, n, interval = bench.broker.port, args.nodes, args.heartbeat_interval
        connected_s, _ = bench.spawn(worker, lambda indices: (indices, port, n, interval, signing_key))
        observer = RecordObserver(port)
        time.sleep(1.0)  # the retained records the subscription brought are in: count only the storm's
        before, publishes = metric(admin, "registrations_total"), metric(admin, "membership_publishes_total")
        cpu0, _ = proc_cpu_rss(bench.registrar.pid)
        observer.counting = True
        t0 = time.monotonic()
        for pipe in bench.pipes:
            pipe.send("go")
        committed_s = None
        while time.monotonic() < t0 + args.timeout:
            if metric(admin, "registrations_total") - before >= args.nodes:
                committed_s = time.monotonic() - t0
                break
            time.sleep(0.01)
        results = []
        deadline = t0 + args.timeout
        for pipe in bench.pipes:
            results.append(pipe.recv() if pipe.poll(max(0.0, deadline - time.monotonic())) else None)
        observer.drain()  # the records go out after the delta that completed the last node
        publishes = metric(admin, "membership_publishes_total") - publishes
        cpu1, rss1 = proc_cpu_rss(bench.registrar.pid)
        time.sleep(2.0)  # nodes have been heartbeating since they connected; let the last publishes drain
        hb_cpu0, _ = proc_cpu_rss(bench.registrar.pid)
        received = metric(admin, "messages_total")
        time.sleep(args.heartbeat_window)
        hb_cpu1, hb_rss = proc_cpu_rss(bench.registrar.pid)
        received = metric(admin, "messages_total") - received
        return summarize(
            Measured(
                broker=kind,
                nodes=args.nodes,
                enroll_s=enroll_s,
                connected_s=connected_s,
                results=[Result(*r) if r is not None else None for r in results],
                t0=t0,
                committed_s=committed_s,
                burst_cpu_s=cpu1 - cpu0,
                burst_rss_kib=rss1,
                heartbeat_interval_s=args.heartbeat_interval,
                heartbeat_window_s=args.heartbeat_window,
                heartbeat_cpu_s=hb_cpu1 - hb_cpu0,
                heartbeat_rss_kib=hb_rss,
                heartbeats_received=received,
                publishes=publishes,
                observer_messages=observer.messages,
                observer_bytes=observer.bytes,
                loadavg=os.getloadavg()[0],
            )
        )
    finally:
        if observer is not None:
            observer.close()
        bench.close()


def run_churn(kind: str, args: argparse.Namespace) -> dict:
    bench = Bench(kind, args, seeded=args.nodes)
    try:
        admin = bench.start_registrar()
        signing_key = signing_key_of(bench.state)
        port, n, interval = bench.broker.port, args.nodes, args.heartbeat_interval
        agents, light = sample_split(n, args.sample)
        if len(agents) <= args.rounds:
            raise SystemExit(f"--sample must exceed --rounds ({args.rounds}): one agent leaves per round, others watch")
        # Both kinds at once: every member connects and heartbeats well within the TTL of the registrar's start.
        t_connect = time.monotonic()
        light_pipes = bench.start(light_worker, lambda indices: (indices, port, interval), light)
        pipes = bench.start(worker, lambda indices: (indices, port, n, interval, signing_key), agents)
        bench.wait_ready(light_pipes + pipes)
        connected_s = time.monotonic() - t_connect
        secret = new_token(admin)
        time.sleep(2.0)  # let the last catch-ups of the connection drain

        def watch(node: str, what: str, leaver: int | None, act) -> list[float] | None:
            for pipe in pipes:
                pipe.send(("watch", node, what, leaver))
            t0 = act()
            answers = []
            deadline = time.monotonic() + args.timeout
            for pipe in pipes:
                answers.append(pipe.recv() if pipe.poll(max(0.0, deadline - time.monotonic())) else None)
            if any(a is None for a in answers):
                return None
            if t0 is None:  # a leave: the goodbye's publish, as the leaver's worker saw it
                t0 = next(a[2] for a in answers if a[2] is not None)
            return [t - t0 for a in answers for t in a[1]]

        def light_counts() -> tuple[int, int]:
            """(heartbeats the light nodes sent, their connections the broker closed), so far."""
            counts = []
            for pipe in light_pipes:
                pipe.send("count")
                counts.append(pipe.recv())
            return sum(c[0] for c in counts), sum(c[1] for c in counts)

        joins, leaves, enroll_calls = [], [], []
        (sent0, _), received0 = light_counts(), metric(admin, "messages_total")
        t_start, (reg_cpu0, _), (broker_cpu0, _) = time.monotonic(), *usage(bench)
        for r in range(args.rounds):
            joiner = n + r

            def join(joiner: int = joiner) -> float:
                t0 = time.monotonic()
                enroll(admin, joiner, secret)
                enroll_calls.append(time.monotonic() - t0)
                return t0

            # Apart by more than the registrar's publish window (0.2 s): each event comes to a quiet registrar and
            # goes out at once (the leading edge), as a single join or leave in a steady mesh does.
            joins.append(watch(node_id(joiner), "join", None, join))
            time.sleep(1.0)
            leaves.append(watch(node_id(agents[r]), "leave", agents[r], lambda: None))
            time.sleep(1.0)
        window_s, ((reg_cpu1, reg_rss), (broker_cpu1, broker_rss)) = time.monotonic() - t_start, usage(bench)
        # Every light node still connected (the fan-out was that of N throughout), and how much the registrar heard.
        (sent1, closed), received1 = light_counts(), metric(admin, "messages_total")
        return summarize_churn(
            ChurnMeasured(
                kind, args.nodes, connected_s, joins, leaves, loadavg=os.getloadavg()[0], agents=len(agents),
                light_closed=closed, light_sent=sent1 - sent0, registrar_received=received1 - received0,
                enroll_calls=tuple(enroll_calls), window_s=window_s, registrar_cpu_s=reg_cpu1 - reg_cpu0,
                registrar_rss_kib=reg_rss, broker_cpu_s=broker_cpu1 - broker_cpu0, broker_rss_kib=broker_rss,
            )  # fmt: skip
        )
    finally:
        bench.close()


def usage(bench: Bench) -> tuple[tuple[float, int], tuple[float, int]]:
    """(CPU seconds, RSS KiB) of the registrar and of the broker."""
    return proc_cpu_rss(bench.registrar.pid), proc_cpu_rss(bench.broker.pid)


def run_heartbeats(kind: str, args: argparse.Namespace) -> dict:
    bench = Bench(kind, args, seeded=args.nodes)
    try:
        admin = bench.start_registrar()
        port, interval = bench.broker.port, args.heartbeat_interval
        connected_s, _ = bench.spawn(light_worker, lambda indices: (indices, port, interval))
        time.sleep(interval + 2.0)  # every node has heartbeated, the registrar's start is behind us

        def sample() -> tuple:
            counts = []
            for pipe in bench.pipes:
                pipe.send("count")
            for pipe in bench.pipes:
                counts.append(pipe.recv())
            return (
                sum(c[0] for c in counts),
                sum(c[1] for c in counts),
                metric(admin, "messages_total"),
                proc_cpu_rss(bench.registrar.pid),
                proc_cpu_rss(bench.broker.pid),
            )

        sent0, _, received0, (reg_cpu0, _), (broker_cpu0, _) = sample()
        time.sleep(args.heartbeat_window)
        sent1, closed, received1, (reg_cpu1, reg_rss), (broker_cpu1, broker_rss) = sample()
        return summarize_heartbeats(
            HeartbeatMeasured(
                broker=kind, nodes=args.nodes, interval_s=interval, connected_s=connected_s,
                window_s=args.heartbeat_window, sent=sent1 - sent0, received=received1 - received0, closed=closed,
                registrar_cpu_s=reg_cpu1 - reg_cpu0, registrar_rss_kib=reg_rss, broker_cpu_s=broker_cpu1 - broker_cpu0,
                broker_rss_kib=broker_rss, loadavg=os.getloadavg()[0],
            )  # fmt: skip
        )
    finally:
        bench.close()


RUNS = {"storm": run_storm, "churn": run_churn, "heartbeats": run_heartbeats}


def raise_open_files_limit() -> None:
    """One socket per simulated node, here and in the broker (a child): up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(RUNS), default="storm")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--broker", choices=["mosquitto", "amqtt", "both"], default="both")
    p.add_argument("--workers", type=int, default=4, help="processes driving the simulated nodes")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-ttl", type=float, default=60.0)
    p.add_argument("--heartbeat-window", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=5, help="churn: joins and leaves")
    p.add_argument(
        "--sample", type=int, default=0,
        help="churn: K full simulated agents, timed; the other N-K members are light nodes (0: all N are agents)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (broker log, registrar state)")
    p.add_argument("--json", type=Path, help="write the figures (one object per broker run, in a list if both)")
    args = p.parse_args()
    # SIGTERM runs the finally blocks: brokers and the registrar subprocess are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    raise_open_files_limit()
    runs = []
    for kind in ["mosquitto", "amqtt"] if args.broker == "both" else [args.broker]:
        runs.append(RUNS[args.mode](kind, args))
        print(json.dumps(runs[-1]), flush=True)
        if args.json:  # after each run: a later one that fails must not lose the earlier figures
            args.json.write_text(json.dumps(runs[0] if args.broker != "both" else runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
