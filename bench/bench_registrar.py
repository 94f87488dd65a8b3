"""How the registrar copes with a big mesh: N simulated nodes register and must all hold the full roster.

    python bench/bench_registrar.py [--nodes 1000] [--broker mosquitto|amqtt|both] [--threads 4]
                                    [--heartbeat-interval 1] [--heartbeat-window 20]

For each broker: start it (open, no ACL, on a random 127.0.0.1 port) and the registrar as a subprocess
(`python -m registrar run`, fresh state dir, SQLite); connect N paho clients multiplexed on a few threads (one
selector per thread, paho's external-loop API); each subscribes like an agent (reply/<self>, members/+, roster,
registrar; QoS 1) and publishes one RegisterRequest. Measured:

- registration: from the first request until every node has its reply -> registrations/s;
- convergence: from the first request until every node holds a complete view (a record at least as new as the
  roster says for each of the N members);
- heartbeats: every node heartbeats every --heartbeat-interval s for --heartbeat-window s; the registrar's CPU
  (utime + stime from /proc) and RSS over that window.

Nodes are not WireGuard-configured: this measures the control plane only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from brokers import free_port, start_embedded, start_mosquitto  # noqa: E402

from meshcontract import messages, topics  # noqa: E402
from meshcontract.messages import Heartbeat, MemberRecord, RegisterReply, Roster  # noqa: E402
from meshcontract.topics import Kind  # noqa: E402
from meshcontract.transport import BrokerSettings, make_client  # noqa: E402

MESH = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class SimNode:
    """One simulated agent: its client and what it has seen."""

    def __init__(self, index: int, port: int) -> None:
        self.index = index
        self.node_id = f"node{index:05d}"
        self.key = base64.b64encode(index.to_bytes(4, "big") * 8).decode()
        self.port = port
        self.reply_at: float | None = None
        self.records: dict[str, int] = {}
        self.roster: dict[str, int] = {}
        self.roster_rev = -1
        self.complete_at: float | None = None
        self.subscribed = False
        self.registrar_online = False
        # like an agent: meshcontract.transport (MQTT 3.1.1, TCP_NODELAY; without it PUBACKs wait on Nagle)
        self.client = make_client(BrokerSettings(url=f"mqtt://127.0.0.1:{port}"), client_id=self.node_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
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

    def _on_subscribe(self, client, userdata, mid, rcs, props) -> None:
        self.subscribed = True

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
        hb = Heartbeat(node_id=self.node_id, epoch=1, seq=seq, sent_at=time.time())
        self.client.publish(topics.build(MESH, Kind.HEARTBEAT, self.node_id), messages.encode(hb), qos=0)

    def _on_message(self, client, userdata, msg) -> None:
        kind = msg.topic.split("/")[3]
        if kind == Kind.REPLY:
            reply = messages.decode(RegisterReply, msg.payload)
            if reply.ok and self.reply_at is None:
                self.reply_at = time.monotonic()
        elif kind == Kind.MEMBERS and msg.payload:
            rec = messages.decode(MemberRecord, msg.payload)
            self.records[rec.node_id] = rec.revision
        elif kind == Kind.REGISTRAR:
            self.registrar_online = b'"online"' in msg.payload
        elif kind == Kind.ROSTER:
            roster = messages.decode(Roster, msg.payload, max_size=messages.MAX_ROSTER_PAYLOAD)
            if roster.revision > self.roster_rev:
                self.roster_rev = roster.revision
                self.roster = {e.node_id: e.revision for e in roster.members}

    def check_complete(self, n: int) -> bool:
        if self.complete_at is not None:
            return True
        if len(self.roster) == n and len(self.records) >= n:
            if all(self.records.get(i, -1) >= r for i, r in self.roster.items()):
                self.complete_at = time.monotonic()
                return True
        return False


class Mux(threading.Thread):
    """Drives many paho clients from one thread with a selector (paho's external event loop API)."""

    def __init__(self, nodes: list[SimNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.stop = threading.Event()
        self.actions: list = []
        self.lock = threading.Lock()

    def call(self, fn) -> None:
        with self.lock:
            self.actions.append(fn)

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for node in self.nodes:
            node.client.connect("127.0.0.1", node.port, keepalive=60)
            sel.register(node.client.socket(), selectors.EVENT_READ, node)
        last_misc = time.monotonic()
        while not self.stop.is_set():
            with self.lock:
                actions, self.actions = self.actions, []
            for fn in actions:
                fn()
            for node in self.nodes:
                if node.client.want_write():
                    node.client.loop_write()
            for key, _ in sel.select(timeout=0.02):
                key.data.client.loop_read(max_packets=100)
            if time.monotonic() - last_misc > 1.0:
                last_misc = time.monotonic()
                for node in self.nodes:
                    node.client.loop_misc()
        for node in self.nodes:
            node.client.disconnect()
            node.client.loop_write()


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    """(utime + stime in seconds, RSS in KiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return cpu, rss


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_one(kind: str, args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-registrar-"))
    broker = (start_mosquitto if kind == "mosquitto" else start_embedded)(tmp, users=None)
    state = tmp / "state"
    env = {
        **os.environ,
        "MESHVPN_BROKER__URL": broker.url,
        "MESHVPN_REQUIRE_TOKEN": "false",
        "MESHVPN_ISSUE_CREDENTIALS": "false",
        "MESHVPN_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
    }
    registrar = subprocess.Popen(
        [sys.executable, "-m", "registrar", "run", "--state-dir", str(state), "--mesh", MESH, "--network",
         "100.96.0.0/16", "--heartbeat-interval", str(args.heartbeat_interval), "--heartbeat-ttl",
         str(max(5.0, 5 * args.heartbeat_interval)), "--http", f"127.0.0.1:{free_port()}"],
        env=env, cwd=REPO,
    )  # fmt: skip
    muxes: list[Mux] = []
    try:
        nodes = [SimNode(i, broker.port) for i in range(args.nodes)]
        muxes = [Mux(nodes[t :: args.threads]) for t in range(args.threads)]
        t_connect = time.monotonic()
        for m in muxes:
            m.start()
        # like an agent: register once the registrar's retained status says online
        if not wait_until(lambda: all(n.subscribed and n.registrar_online for n in nodes), 120):
            raise RuntimeError("not all nodes subscribed and seeing the registrar online")
        connected_s = time.monotonic() - t_connect
        cpu0, _ = proc_cpu_rss(registrar.pid)
        t0 = time.monotonic()
        for m in muxes:
            m.call(lambda m=m: [n.register() for n in m.nodes])
        ok_replies = wait_until(lambda: all(n.reply_at for n in nodes), args.timeout)
        replies_done = max((n.reply_at or time.monotonic()) for n in nodes) - t0
        ok_complete = wait_until(lambda: all(n.check_complete(args.nodes) for n in nodes), args.timeout)
        complete_s = max((n.complete_at or time.monotonic()) for n in nodes) - t0
        cpu1, rss1 = proc_cpu_rss(registrar.pid)
        # heartbeats: every node every interval, spread over the interval
        stop = threading.Event()

        def beat() -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                start = time.monotonic()
                for i, m in enumerate(muxes):
                    m.call(lambda m=m, s=seq: [n.heartbeat(s) for n in m.nodes])
                    stop.wait(args.heartbeat_interval / len(muxes) * (i + 1) - (time.monotonic() - start))

        time.sleep(1.0)
        hb_cpu0, _ = proc_cpu_rss(registrar.pid)
        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        time.sleep(args.heartbeat_window)
        hb_cpu1, hb_rss = proc_cpu_rss(registrar.pid)
        stop.set()
        beater.join()
        return {
            "broker": kind,
            "nodes": args.nodes,
            "connect_subscribe_s": round(connected_s, 2),
            "all_replies": ok_replies,
            "registration_s": round(replies_done, 2),
            "registrations_per_s": round(args.nodes / replies_done, 1) if ok_replies else None,
            "all_complete": ok_complete,
            "full_roster_everywhere_s": round(complete_s, 2),
            "incomplete_nodes": sum(1 for n in nodes if n.complete_at is None),
            "registrar_cpu_during_registration_s": round(cpu1 - cpu0, 2),
            "registrar_rss_after_registration_mib": round(rss1 / 1024, 1),
            "heartbeats_per_s": round(args.nodes / args.heartbeat_interval),
            "registrar_cpu_heartbeats_pct": round(100 * (hb_cpu1 - hb_cpu0) / args.heartbeat_window, 1),
            "registrar_rss_heartbeats_mib": round(hb_rss / 1024, 1),
        }
    finally:
        for m in muxes:
            m.stop.set()
        for m in muxes:
            m.join(10)
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
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-window", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    kinds = ["mosquitto", "amqtt"] if args.broker == "both" else [args.broker]
    for kind in kinds:
        print(json.dumps(run_one(kind, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
