"""How the registrar copes with a big mesh: N enrolled nodes register at once and must all follow the membership.

    python bench/bench_registrar.py [--nodes 1000] [--broker mosquitto|amqtt|both] [--workers 4]
                                    [--heartbeat-interval 1] [--heartbeat-window 20] [--heartbeat-ttl 60] [--keep]
                                    [--json FILE]

For each broker: start it with access control as shipped, on a random 127.0.0.1 port in plain TCP (Mosquitto
with the dynamic security plugin, whose node accounts the registrar creates through its admin; or the embedded
amqtt broker as `python -m broker` reading the password file the registrar writes), and the registrar as a
subprocess (`python -m registrar run`, fresh state dir, SQLite WAL). Then:

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
4. Heartbeats: after convergence, the registrar's CPU (utime + stime from /proc) and RSS over
   --heartbeat-window s while every node heartbeats every --heartbeat-interval s.

Each run prints one JSON line of figures (`summarize`), and --json FILE writes them too: an object for one broker,
a list of them with --broker both. Among them: nodes, broker, full_roster_s (3., every node holds all N at their
new endpoint), registrations_per_s (3., committed), registrar_cpu_pct and registrar_rss_mb (4., RSS in MiB).

Every worker checks the registrar's signature (the key its enrollment reply carried) on the first snapshot and
the first delta it receives; everything else is parsed lightly, so that the bench measures the registrar and
the broker rather than the simulated agents. --heartbeat-ttl is long by default so that nodes enrolled first do
not expire while the rest enroll and connect.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# This checkout's packages, here and in every subprocess (registrar, embedded broker), before any installed copy.
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from brokers import free_port, start_embedded, start_mosquitto  # noqa: E402

from meshcontract import jointoken, messages, topics  # noqa: E402
from meshcontract.messages import EnrollRequest, MembershipDelta, MembershipSnapshot  # noqa: E402
from meshcontract.signing import Verifier  # noqa: E402
from meshcontract.topics import Kind  # noqa: E402
from meshcontract.transport import BrokerSettings, make_client  # noqa: E402

MESH = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
RETRY_S = 10.0  # an agent re-sends an unanswered RegisterRequest
REGISTRAR_PASSWORD = "bench-registrar-password"
ENROLLED_HOST = "192.0.2.1"  # the endpoint each node enrolls with ...
REGISTERED_HOST = "192.0.2.2"  # ... and the one it registers with in the burst
MAX_BUFFERED_DELTAS = 256  # as nodeagent.membership


def node_id(index: int) -> str:
    return f"node{index:05d}"


def node_password(index: int) -> str:
    return f"bench-password-{index:05d}"


def node_key(index: int) -> str:
    return base64.b64encode((index + 1).to_bytes(4, "big") * 8).decode()


class SignatureCheck:
    """One worker's check of the registrar's signature on the first snapshot and the first delta it receives."""

    def __init__(self, signing_key: str) -> None:
        self._verifier = Verifier(signing_key)
        self.checked: set[Kind] = set()

    def once(self, kind: Kind, payload: bytes) -> None:
        if kind in self.checked:
            return
        model = MembershipSnapshot if kind is Kind.SNAPSHOT else MembershipDelta
        message = messages.decode(model, payload, max_size=messages.MAX_MEMBERSHIP_PAYLOAD)
        self._verifier.verify(message, kind=str(kind), mesh=MESH)  # raises if forged or altered
        self.checked.add(kind)


class SimNode:
    """One simulated agent: its client, and the membership it follows (by revision, with resync on a gap)."""

    def __init__(self, index: int, port: int, n: int, signatures: SignatureCheck) -> None:
        self.node_id = node_id(index)
        self.index = index
        self.n = n
        self.signatures = signatures
        self.reply_at: float | None = None
        self.sent_at = 0.0
        self.complete_at: float | None = None
        self.revision: int | None = None  # of the membership held
        self.hosts: dict[str, str] = {}  # node id -> first endpoint's host, in the membership held
        self.syncing = True
        self.buffered: list[dict] = []
        self.subscribed = False
        self.registrar_online = False
        self.snapshot_topic = topics.build(MESH, Kind.SNAPSHOT)
        settings = BrokerSettings(
            url=f"mqtt://127.0.0.1:{port}", username=self.node_id, password=node_password(index), keepalive_s=60
        )
        self.client = make_client(settings, client_id=self.node_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: setattr(self, "subscribed", True)
        self.client.on_connect = self._on_connect
        self.client.max_inflight_messages_set(100)

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        if rc.is_failure:
            raise RuntimeError(f"{self.node_id}: the broker refused the login: {rc}")
        client.subscribe(
            [
                (topics.build(MESH, Kind.REPLY, self.node_id), 1),
                (topics.build(MESH, Kind.DELTA), 1),
                (topics.build(MESH, Kind.REGISTRAR), 1),
                (self.snapshot_topic, 1),
            ]
        )

    @property
    def in_sync_with_all(self) -> bool:
        return not self.syncing and len(self.hosts) == self.n

    def register(self) -> None:
        req = {
            "request_id": f"bench-{self.node_id}-{int(self.sent_at * 1000)}",
            "node_id": self.node_id,
            "name": self.node_id,
            "public_key": node_key(self.index),
            "listen_port": 51820,
            "endpoints": [{"host": REGISTERED_HOST, "port": 51820}],
            "epoch": 1,
        }
        self.client.publish(topics.build(MESH, Kind.REGISTER, self.node_id), json.dumps(req), qos=1)

    def heartbeat(self, seq: int) -> None:
        hb = {"v": 1, "node_id": self.node_id, "epoch": 1, "seq": seq, "sent_at": time.time()}
        self.client.publish(topics.build(MESH, Kind.HEARTBEAT, self.node_id), json.dumps(hb), qos=0)

    def _on_message(self, client, userdata, msg) -> None:
        kind = msg.topic.split("/")[3]
        if kind == "snapshot" and msg.payload:
            self.signatures.once(Kind.SNAPSHOT, msg.payload)
            self._on_snapshot(json.loads(msg.payload))
        elif kind == "delta":
            self.signatures.once(Kind.DELTA, msg.payload)
            self._on_delta(json.loads(msg.payload))
        elif kind == "reply":
            if self.reply_at is None and b'"ok":true' in msg.payload:
                self.reply_at = time.monotonic()
        elif kind == "registrar":
            self.registrar_online = b'"online"' in msg.payload
        if (
            self.complete_at is None
            and self.reply_at is not None
            and self.in_sync_with_all
            and all(host == REGISTERED_HOST for host in self.hosts.values())
        ):
            self.complete_at = time.monotonic()

    def _on_snapshot(self, snapshot: dict) -> None:
        if not self.syncing or (self.revision is not None and snapshot["revision"] < self.revision):
            return
        self.revision = snapshot["revision"]
        self.hosts = {r["node_id"]: r["endpoints"][0]["host"] for r in snapshot["members"]}
        self.syncing = False
        buffered, self.buffered = sorted(self.buffered, key=lambda d: d["from_revision"]), []
        for delta in buffered:
            self._on_delta(delta)
        if not self.syncing:
            self.client.unsubscribe(self.snapshot_topic)  # in sync: from now on deltas only, like an agent

    def _on_delta(self, delta: dict) -> None:
        if self.revision is not None and delta["to_revision"] <= self.revision:
            return
        if self.syncing:
            self.buffered = [*self.buffered, delta][-MAX_BUFFERED_DELTAS:]
            return
        if delta["from_revision"] == self.revision:
            for removed in delta["removals"]:
                self.hosts.pop(removed, None)
            for record in delta["upserts"]:
                self.hosts[record["node_id"]] = record["endpoints"][0]["host"]
            self.revision = delta["to_revision"]
            return
        self.syncing, self.buffered = True, [delta]  # a gap: fetch the snapshot again
        self.client.subscribe(self.snapshot_topic, 1)


def worker(indices: list[int], port: int, n: int, conn, hb_interval: float, signing_key: str) -> None:
    """One process: a selector loop over its nodes' sockets and the control pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signatures = SignatureCheck(signing_key)
    nodes = [SimNode(i, port, n, signatures) for i in indices]
    sel = selectors.DefaultSelector()
    for node in nodes:
        node.client.connect("127.0.0.1", port, keepalive=60)
        sel.register(node.client.socket(), selectors.EVENT_READ, node)
    sel.register(conn, selectors.EVENT_READ, None)
    phase, ready_sent, done_sent, sent_at = "connect", False, False, 0.0
    hb_next, seq, last_misc = time.monotonic() + hb_interval, 0, time.monotonic()
    while phase != "stop":
        for node in nodes:
            if node.client.want_write():
                node.client.loop_write()
        for key, _ in sel.select(timeout=0.01):
            if key.data is None:
                cmd = conn.recv()
                if cmd == "go":
                    phase = "register"
                    for node in nodes:
                        node.sent_at = time.monotonic()
                        node.register()
                elif cmd == "stop":
                    phase = "stop"
            else:
                key.data.client.loop_read(max_packets=1000)
        now = time.monotonic()
        if now - last_misc > 1.0:
            last_misc = now
            for node in nodes:
                node.client.loop_misc()
        if not ready_sent and all(x.subscribed and x.registrar_online and x.in_sync_with_all for x in nodes):
            conn.send("ready")
            ready_sent = True
        if phase == "register" and not sent_at and not any(x.client.want_write() for x in nodes):
            sent_at = time.monotonic()  # every request of the burst handed to the kernel
        if phase == "register" and not done_sent and all(x.complete_at for x in nodes):
            checked = signatures.checked == {Kind.SNAPSHOT, Kind.DELTA}
            done = ("done", max(x.reply_at for x in nodes), max(x.complete_at for x in nodes), 0, checked, sent_at)
            conn.send(done)
            done_sent = True
        if now >= hb_next:  # like agents: heartbeat from the connection on, not only once registered
            seq += 1
            hb_next += hb_interval
            for node in nodes:
                node.heartbeat(seq)
                if phase == "register" and node.reply_at is None and now - node.sent_at > RETRY_S:
                    node.sent_at = now
                    node.register()
    if not done_sent:
        replies = [x.reply_at for x in nodes if x.reply_at]
        completes = [x.complete_at for x in nodes if x.complete_at]
        missing = sum(1 for x in nodes if not x.complete_at)
        conn.send(("partial", max(replies, default=0.0), max(completes, default=0.0), missing, False, sent_at))
    for node in nodes:
        node.client.disconnect()
        node.client.loop_write()


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


def registrations(admin: httpx.Client) -> int:
    """The registrar's count of registrations answered ok (committed first), from /metrics."""
    for line in admin.get("/metrics").text.splitlines():
        if line.startswith("meshvpn_registrar_registrations_total "):
            return int(float(line.split()[1]))
    raise RuntimeError("no registrations counter in /metrics")


def enroll_all(admin: httpx.Client, n: int) -> str:
    """Enroll nodes 0..n-1 with one reusable token; returns the registrar's signing key from the replies."""
    created = admin.post("/v1/tokens", json={"reusable": True})
    created.raise_for_status()
    secret = jointoken.parse(created.json()["token"]).secret

    def enroll(index: int) -> str:
        request = EnrollRequest(
            node_id=node_id(index), name=node_id(index), public_key=node_key(index), listen_port=51820,
            endpoints=[{"host": ENROLLED_HOST, "port": 51820}], token=secret, password=node_password(index),
        )  # fmt: skip
        reply = admin.post("/v1/enroll", content=request.model_dump_json())
        if reply.status_code != 200:
            raise RuntimeError(f"enrolling {node_id(index)}: HTTP {reply.status_code} {reply.text}")
        return reply.json()["signing_key"]

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(enroll, range(n)))
    if len(keys) != 1:
        raise RuntimeError(f"the enrollment replies carry {len(keys)} different signing keys")
    return keys.pop()


def start_registrar(kind: str, broker, tmp: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, Path]:
    """`python -m registrar run` on `broker`, managing its node accounts as in production; (process, admin socket)."""
    env = {**os.environ, "MESHVPN_BROKER__PASSWORD": REGISTRAR_PASSWORD, "MESHVPN_LOG_LEVEL": "WARNING"}
    if kind == "mosquitto":
        env.update(MESHVPN_BROKER_ACCOUNTS="dynsec", MESHVPN_BROKER_ADMIN_PASSWORD=broker.admin_password)
    else:
        env.update(MESHVPN_BROKER_ACCOUNTS="password_file", MESHVPN_PASSWORD_FILE=str(broker.password_file))
    state = tmp / "state"
    registrar = subprocess.Popen(
        [sys.executable, "-m", "registrar", "run", "--broker", broker.url, "--state-dir", str(state), "--mesh", MESH,
         "--network", "100.96.0.0/16", "--heartbeat-interval", str(args.heartbeat_interval), "--heartbeat-ttl",
         str(max(args.heartbeat_ttl, 3 * args.heartbeat_interval)), "--http", f"127.0.0.1:{free_port()}",
         "--tls-name", "127.0.0.1"],
        env=env, cwd=REPO,
    )  # fmt: skip
    return registrar, state / "admin.sock"


def wait_ready(registrar: subprocess.Popen, admin: httpx.Client, timeout: float = 60.0) -> None:
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


@dataclass(frozen=True, slots=True)
class Result:
    """What one worker reports: done or partial, and its nodes' latest times (monotonic clock)."""

    status: str  # "done": every node of the worker holds the full membership; "partial": the run timed out
    last_reply_at: float
    last_complete_at: float
    missing: int  # nodes without the full membership (partial only)
    signatures_checked: bool
    all_sent_at: float  # every request of the burst handed to the kernel (0: not yet)


@dataclass(frozen=True, slots=True)
class Measured:
    """The raw measurements of one run, before `summarize` turns them into figures."""

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


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def summarize(m: Measured) -> dict:
    """The figures of one run (what is printed and written by --json). Times are seconds from the burst's start;
    None where the run did not get that far. Pure."""
    results = [r for r in m.results if r is not None]
    complete = bool(m.results) and len(results) == len(m.results) and all(r.status == "done" for r in results)
    sent_s = max(r.all_sent_at for r in results) - m.t0 if complete else None
    reply_s = max(r.last_reply_at for r in results) - m.t0 if complete else None
    roster_s = max(r.last_complete_at for r in results) - m.t0 if complete else None
    committed = m.committed_s if m.committed_s else None
    return {
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
        "heartbeats_per_s": round(m.nodes / m.heartbeat_interval_s),
        "registrar_cpu_pct": round(100 * m.heartbeat_cpu_s / m.heartbeat_window_s, 1),
        "registrar_rss_mb": round(m.heartbeat_rss_kib / 1024, 1),
    }


def run_one(kind: str, args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-registrar-"))
    users = {"registrar": REGISTRAR_PASSWORD}
    broker = start_mosquitto(tmp, users=users, mesh=MESH) if kind == "mosquitto" else start_embedded(
        tmp, users=users, mesh=MESH
    )
    registrar, admin_socket = start_registrar(kind, broker, tmp, args)
    admin = httpx.Client(transport=httpx.HTTPTransport(uds=str(admin_socket)), base_url="http://registrar", timeout=30)
    ctx = mp.get_context("fork")
    procs, pipes = [], []
    try:
        wait_ready(registrar, admin)
        t_enroll = time.monotonic()
        signing_key = enroll_all(admin, args.nodes)
        enroll_s = time.monotonic() - t_enroll
        for w in range(args.workers):
            parent, child = ctx.Pipe()
            indices = list(range(w, args.nodes, args.workers))
            p = ctx.Process(
                target=worker,
                args=(indices, broker.port, args.nodes, child, args.heartbeat_interval, signing_key),
                daemon=True,
            )
            p.start()
            procs.append(p)
            pipes.append(parent)
        t_start = time.monotonic()
        for pipe in pipes:
            if not pipe.poll(300) or pipe.recv() != "ready":
                raise RuntimeError("a worker did not get its nodes connected, subscribed and in sync")
        connected_s = time.monotonic() - t_start
        before = registrations(admin)
        cpu0, _ = proc_cpu_rss(registrar.pid)
        t0 = time.monotonic()
        for pipe in pipes:
            pipe.send("go")
        committed_s = None
        while time.monotonic() < t0 + args.timeout:
            if registrations(admin) - before >= args.nodes:
                committed_s = time.monotonic() - t0
                break
            time.sleep(0.01)
        results = []
        deadline = t0 + args.timeout
        for pipe in pipes:
            results.append(pipe.recv() if pipe.poll(max(0.0, deadline - time.monotonic())) else None)
        cpu1, rss1 = proc_cpu_rss(registrar.pid)
        time.sleep(2.0)  # nodes have been heartbeating since they connected; let the last publishes drain
        hb_cpu0, _ = proc_cpu_rss(registrar.pid)
        time.sleep(args.heartbeat_window)
        hb_cpu1, hb_rss = proc_cpu_rss(registrar.pid)
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
            )
        )
    finally:
        for pipe in pipes:
            try:
                pipe.send("stop")
            except OSError:
                pass
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        admin.close()
        registrar.terminate()
        try:
            registrar.wait(15)
        except subprocess.TimeoutExpired:
            registrar.kill()
        broker.stop()
        if args.keep:
            print(f"kept {tmp} (broker log and config, registrar state)", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--broker", choices=["mosquitto", "amqtt", "both"], default="both")
    p.add_argument("--workers", type=int, default=4, help="processes driving the simulated nodes")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-ttl", type=float, default=60.0)
    p.add_argument("--heartbeat-window", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (broker log, registrar state)")
    p.add_argument("--json", type=Path, help="write the figures (one object per broker run, in a list if both)")
    args = p.parse_args()
    # SIGTERM runs the finally blocks: brokers and the registrar subprocess are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    runs = []
    for kind in ["mosquitto", "amqtt"] if args.broker == "both" else [args.broker]:
        runs.append(run_one(kind, args))
        print(json.dumps(runs[-1]), flush=True)
        if args.json:  # after each run: a later one that fails must not lose the earlier figures
            args.json.write_text(json.dumps(runs[0] if args.broker != "both" else runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
