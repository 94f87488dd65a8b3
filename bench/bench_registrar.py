"""How the registrar copes with a big mesh: N simulated nodes register and must all hold the full roster.

    python bench/bench_registrar.py [--nodes 1000] [--broker mosquitto|amqtt|both] [--workers 4]
                                    [--heartbeat-interval 1] [--heartbeat-window 20]

For each broker: start it (open, no ACL, random 127.0.0.1 port) and the registrar as a subprocess
(`python -m registrar run`, fresh state dir, SQLite WAL). N simulated agents run in a few worker processes, each
driving its paho clients from one selector loop (paho's external-loop API, TCP_NODELAY like every component).
Each subscribes like an agent (reply/<self>, members/+, roster, registrar; QoS 1), waits for the registrar's
retained status online, then all publish one RegisterRequest at once. Measured:

- registration: from the burst until the registrar has admitted and committed all N (polled over its HTTP
  API) -> registrations/s; and until every node has its ok reply (replies queue behind member records in the
  broker's per-client queues);
- full roster everywhere: from the burst until every node holds a complete view (for each of the N roster
  entries a record at least that new) -- N x N record deliveries, the cost of a full mesh;
- heartbeats: every node heartbeats every --heartbeat-interval s from the burst on (and re-sends an unanswered
  request after 10 s, like an agent); after convergence the registrar's CPU (utime + stime from /proc) and RSS
  are measured over --heartbeat-window s.

Mosquitto runs with the shipped config (tests/brokers.py renders it with broker/mosquitto_config.py, open and
without ACL here), whose per-client queue limits are what a mesh this size needs: with Mosquitto's default of
1000 queued messages, a burst of N = 1000 records to every agent overflows the queue of any agent that is slower
than the burst and Mosquitto drops records ("Outgoing messages are being dropped"), so those agents never see a
complete roster.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from brokers import free_port, start_embedded, start_mosquitto  # noqa: E402

from meshcontract import topics  # noqa: E402
from meshcontract.topics import Kind  # noqa: E402
from meshcontract.transport import BrokerSettings, make_client  # noqa: E402

MESH = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
RETRY_S = 10.0  # an agent re-sends an unanswered RegisterRequest


class SimNode:
    """One simulated agent: its client and what it has seen (parsed lightly: the bench measures the registrar)."""

    def __init__(self, index: int, port: int, n: int) -> None:
        self.node_id = f"node{index:05d}"
        self.key = base64.b64encode(index.to_bytes(4, "big") * 8).decode()
        self.n = n
        self.reply_at: float | None = None
        self.sent_at = 0.0
        self.complete_at: float | None = None
        self.records: dict[str, int] = {}
        self.roster: dict[str, int] = {}
        self.roster_rev = -1
        self.subscribed = False
        self.registrar_online = False
        self.client = make_client(
            BrokerSettings(url=f"mqtt://127.0.0.1:{port}", keepalive_s=60), client_id=self.node_id
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: setattr(self, "subscribed", True)
        self.client.on_connect = self._on_connect
        self.client.max_inflight_messages_set(100)

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        client.subscribe(
            [
                (topics.build(MESH, Kind.REPLY, self.node_id), 1),
                (topics.subscription(MESH, Kind.MEMBERS), 1),
                (topics.subscription(MESH, Kind.ROSTER), 1),
                (topics.subscription(MESH, Kind.REGISTRAR), 1),
            ]
        )

    def register(self) -> None:
        req = {
            "request_id": f"bench-{self.node_id}",
            "node_id": self.node_id,
            "name": self.node_id,
            "public_key": self.key,
            "listen_port": 51820,
            "endpoints": [{"host": "192.0.2.1", "port": 51820}],
            "epoch": 1,
        }
        self.client.publish(topics.build(MESH, Kind.REGISTER, self.node_id), json.dumps(req), qos=1)

    def heartbeat(self, seq: int) -> None:
        hb = {"v": 1, "node_id": self.node_id, "epoch": 1, "seq": seq, "sent_at": time.time()}
        self.client.publish(topics.build(MESH, Kind.HEARTBEAT, self.node_id), json.dumps(hb), qos=0)

    def _on_message(self, client, userdata, msg) -> None:
        kind = msg.topic.split("/")[3]
        if kind == "members":
            if msg.payload:
                rec = json.loads(msg.payload)
                self.records[rec["node_id"]] = rec["revision"]
        elif kind == "roster":
            roster = json.loads(msg.payload)
            if roster["revision"] > self.roster_rev:
                self.roster_rev = roster["revision"]
                self.roster = {e["node_id"]: e["revision"] for e in roster["members"]}
        elif kind == "reply":
            if self.reply_at is None and b'"ok":true' in msg.payload:
                self.reply_at = time.monotonic()
        elif kind == "registrar":
            self.registrar_online = b'"online"' in msg.payload
        if self.complete_at is None and len(self.roster) == self.n and len(self.records) >= self.n:
            if all(self.records.get(i, -1) >= r for i, r in self.roster.items()):
                self.complete_at = time.monotonic()


def worker(indices: list[int], port: int, n: int, conn, hb_interval: float) -> None:
    """One process: a selector loop over its nodes' sockets and the control pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    nodes = [SimNode(i, port, n) for i in indices]
    sel = selectors.DefaultSelector()
    for node in nodes:
        node.client.connect("127.0.0.1", port, keepalive=60)
        sel.register(node.client.socket(), selectors.EVENT_READ, node)
    sel.register(conn, selectors.EVENT_READ, None)
    phase, ready_sent, done_sent = "connect", False, False
    hb_next, seq, last_misc = 0.0, 0, time.monotonic()
    while phase != "stop":
        for node in nodes:
            if node.client.want_write():
                node.client.loop_write()
        for key, _ in sel.select(timeout=0.01):
            if key.data is None:
                cmd = conn.recv()
                if cmd == "go":
                    # like agents: register, then heartbeat from the start (retrying unanswered requests)
                    phase, hb_next = "register", time.monotonic() + hb_interval
                    for node in nodes:
                        node.register()
                        node.sent_at = time.monotonic()
                elif cmd == "stop":
                    phase = "stop"
            else:
                key.data.client.loop_read(max_packets=1000)
        now = time.monotonic()
        if now - last_misc > 1.0:
            last_misc = now
            for node in nodes:
                node.client.loop_misc()
        if not ready_sent and all(x.subscribed and x.registrar_online for x in nodes):
            conn.send("ready")
            ready_sent = True
        if phase == "register" and not done_sent and all(x.reply_at and x.complete_at for x in nodes):
            conn.send(("done", max(x.reply_at for x in nodes), max(x.complete_at for x in nodes), 0))
            done_sent = True
        if phase == "register" and now >= hb_next:
            seq += 1
            hb_next += hb_interval
            for node in nodes:
                node.heartbeat(seq)
                if node.reply_at is None and now - node.sent_at > RETRY_S:
                    node.register()
                    node.sent_at = now
    if not done_sent:
        replies = [x.reply_at for x in nodes if x.reply_at]
        completes = [x.complete_at for x in nodes if x.complete_at]
        missing = sum(1 for x in nodes if not (x.reply_at and x.complete_at))
        conn.send(("partial", max(replies, default=0.0), max(completes, default=0.0), missing))
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


def run_one(kind: str, args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-registrar-"))
    if kind == "mosquitto":
        broker = start_mosquitto(tmp, users=None)
    else:
        broker = start_embedded(tmp, users=None)
    env = {
        **os.environ,
        "MESHVPN_BROKER__URL": broker.url,
        "MESHVPN_REQUIRE_TOKEN": "false",
        "MESHVPN_ISSUE_CREDENTIALS": "false",
        "MESHVPN_LOG_LEVEL": "WARNING",
    }
    http_port = free_port()
    registrar = subprocess.Popen(
        [sys.executable, "-m", "registrar", "run", "--state-dir", str(tmp / "state"), "--mesh", MESH, "--network",
         "100.96.0.0/16", "--heartbeat-interval", str(args.heartbeat_interval), "--heartbeat-ttl",
         str(max(5.0, 5 * args.heartbeat_interval)), "--http", f"127.0.0.1:{http_port}"],
        env=env, cwd=REPO,
    )  # fmt: skip
    ctx = mp.get_context("fork")
    procs, pipes = [], []
    try:
        for w in range(args.workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker,
                args=(
                    list(range(w, args.nodes, args.workers)),
                    broker.port,
                    args.nodes,
                    child,
                    args.heartbeat_interval,
                ),
                daemon=True,
            )
            p.start()
            procs.append(p)
            pipes.append(parent)
        t_start = time.monotonic()
        for pipe in pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise RuntimeError("a worker did not get its nodes connected and subscribed")
        connected_s = time.monotonic() - t_start
        for _ in range(500):  # the HTTP API starts a moment after the MQTT side
            try:
                httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.02)
        cpu0, _ = proc_cpu_rss(registrar.pid)
        t0 = time.monotonic()
        for pipe in pipes:
            pipe.send("go")
        # the registrar's side: every node admitted and committed (HTTP reads the writer's snapshot)
        admitted_s = None
        while time.monotonic() < t0 + args.timeout:
            if httpx.get(f"http://127.0.0.1:{http_port}/v1/mesh", timeout=5).json()["members"] >= args.nodes:
                admitted_s = time.monotonic() - t0
                break
            time.sleep(0.01)
        results = []
        deadline = t0 + args.timeout
        for pipe in pipes:
            if pipe.poll(max(0.0, deadline - time.monotonic())):
                results.append(pipe.recv())
            else:
                results.append(None)
        cpu1, rss1 = proc_cpu_rss(registrar.pid)
        complete = all(r is not None and r[0] == "done" for r in results)
        reply_s = max(r[1] for r in results if r) - t0 if complete else None
        roster_s = max(r[2] for r in results if r) - t0 if complete else None
        time.sleep(2.0)  # nodes have been heartbeating since the burst; let the last publishes drain
        hb_cpu0, _ = proc_cpu_rss(registrar.pid)
        time.sleep(args.heartbeat_window)
        hb_cpu1, hb_rss = proc_cpu_rss(registrar.pid)
        return {
            "broker": kind,
            "nodes": args.nodes,
            "connect_subscribe_s": round(connected_s, 2),
            "all_complete": complete,
            "registrar_admitted_all_s": round(admitted_s, 2) if admitted_s else None,
            "registrar_registrations_per_s": round(args.nodes / admitted_s) if admitted_s else None,
            "every_node_has_its_reply_s": round(reply_s, 2) if reply_s else None,
            "full_roster_everywhere_s": round(roster_s, 2) if roster_s else None,
            "registrar_cpu_s_during_burst": round(cpu1 - cpu0, 2),
            "registrar_rss_mib_after_burst": round(rss1 / 1024, 1),
            "heartbeats_per_s": round(args.nodes / args.heartbeat_interval),
            "registrar_cpu_pct_heartbeats": round(100 * (hb_cpu1 - hb_cpu0) / args.heartbeat_window, 1),
            "registrar_rss_mib_heartbeats": round(hb_rss / 1024, 1),
        }
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
        registrar.terminate()
        try:
            registrar.wait(15)
        except subprocess.TimeoutExpired:
            registrar.kill()
        broker.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--broker", choices=["mosquitto", "amqtt", "both"], default="both")
    p.add_argument("--workers", type=int, default=4, help="processes driving the simulated nodes")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-window", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    # SIGTERM runs the finally blocks: brokers and the registrar subprocess are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    for kind in ["mosquitto", "amqtt"] if args.broker == "both" else [args.broker]:
        print(json.dumps(run_one(kind, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
