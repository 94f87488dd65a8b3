"""The simulated members of bench_registrar: full agents (paho, following the signed stream) and light nodes.

Full agents (`SimNode`, driven by `worker`) log in as themselves, subscribe like an agent, follow the signed
snapshot and deltas as nodeagent.membership does, and heartbeat. Light nodes (`light_worker`) speak raw MQTT 3.1.1
over one socket each: they log in, subscribe like an agent, heartbeat, and parse nothing, so that 10,000 fit on two
cores. bench_registrar.py starts the processes and reads the figures; the sys.path it sets up (this checkout's
packages) is what the imports below rely on.
"""

from __future__ import annotations

import base64
import json
import selectors
import signal
import socket
import sys
import time

from meshcontract import messages, topics
from meshcontract.messages import MembershipDelta, MembershipSnapshot
from meshcontract.signing import Verifier
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings, make_client

MESH = "bench"
RETRY_S = 10.0  # an agent re-sends an unanswered RegisterRequest
REGISTERED_HOST = "192.0.2.2"  # the endpoint each node registers with in the storm's burst (and a seeded one has)
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
        self.states: dict[str, str] = {}  # node id -> its state, in the membership held
        self.syncing = True
        self.buffered: list[dict] = []
        self.subscribed = False
        self.registrar_online = False
        self.counting = False  # count the stream's messages and bytes (from the storm's start)
        self.stream_messages = 0
        self.stream_bytes = 0
        self.watch: tuple[str, str] | None = None  # churn: (node id, "join" | "leave") to notice
        self.seen_at: float | None = None  # when the watched change showed in a complete membership
        self.left = False  # said goodbye: silent from then on, like a stopped agent
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
        self.client.publish(topics.build(MESH, Kind.HEARTBEAT, self.node_id), heartbeat_payload(self.node_id, seq), qos=0)

    def goodbye(self) -> float:
        """Say goodbye like a stopping agent (an offline status that is not a will); returns when it was sent."""
        status = {"v": 1, "node_id": self.node_id, "state": "offline", "epoch": 1, "at": time.time()}
        self.client.publish(topics.build(MESH, Kind.STATUS, self.node_id), json.dumps(status), qos=1, retain=True)
        self.left = True
        return time.monotonic()

    def _on_message(self, client, userdata, msg) -> None:
        kind = msg.topic.split("/")[3]
        if kind == "snapshot" and msg.payload:
            self._count(msg)
            self.signatures.once(Kind.SNAPSHOT, msg.payload)
            self._on_snapshot(json.loads(msg.payload))
        elif kind == "delta":
            self._count(msg)
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
            self.counting = False
        if self.watch is not None and self.seen_at is None and not self.syncing:
            node, what = self.watch
            if (what == "join" and node in self.hosts) or (what == "leave" and self.states.get(node) == "unreachable"):
                self.seen_at = time.monotonic()

    def _count(self, msg) -> None:
        if self.counting:
            self.stream_messages += 1
            self.stream_bytes += len(msg.topic) + len(msg.payload)

    def _on_snapshot(self, snapshot: dict) -> None:
        if not self.syncing or (self.revision is not None and snapshot["revision"] < self.revision):
            return
        self.revision = snapshot["revision"]
        self.hosts = {r["node_id"]: r["endpoints"][0]["host"] for r in snapshot["members"]}
        self.states = {r["node_id"]: r["state"] for r in snapshot["members"]}
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
                self.states.pop(removed, None)
            for record in delta["upserts"]:
                self.hosts[record["node_id"]] = record["endpoints"][0]["host"]
                self.states[record["node_id"]] = record["state"]
            self.revision = delta["to_revision"]
            return
        self.syncing, self.buffered = True, [delta]  # a gap: fetch the snapshot again
        self.client.subscribe(self.snapshot_topic, 1)


def heartbeat_payload(node: str, seq: int) -> bytes:
    return json.dumps({"v": 1, "node_id": node, "epoch": 1, "seq": seq, "sent_at": time.time()}).encode()


def worker(indices: list[int], port: int, n: int, hb_interval: float, signing_key: str, conn) -> None:
    """One process: a selector loop over its nodes' sockets and the control pipe.

    Commands: "go" (the storm: every node registers), ("watch", node id, "join" | "leave", leaver index or None)
    (churn: answered with ("seen", [times], goodbye sent at) once every other node saw it), "stop"."""
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
    watchers: list[SimNode] = []  # churn: the nodes that must notice the watched change
    started, told = time.monotonic(), False
    goodbye_at: float | None = None
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
                        node.counting, node.stream_messages, node.stream_bytes = True, 0, 0
                        node.register()
                elif cmd == "stop":
                    phase = "stop"
                elif cmd[0] == "watch":
                    _, watched, what, leaver = cmd
                    watchers, goodbye_at = [], None
                    for node in nodes:
                        node.watch, node.seen_at = (watched, what), None
                        if node.index == leaver:
                            goodbye_at = node.goodbye()
                        else:
                            watchers.append(node)
                    phase = "watch"
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
        elif not ready_sent and now > started + 60 and not told:
            told = True  # say once why this worker is not ready yet (the run goes on until its timeout)
            print(f"worker of {len(nodes)} nodes not ready after 60 s: "
                  f"{sum(not x.subscribed for x in nodes)} unsubscribed, "
                  f"{sum(not x.registrar_online for x in nodes)} without the registrar online, "
                  f"{sum(x.syncing for x in nodes)} resyncing, "
                  f"{sum(not x.syncing and len(x.hosts) != x.n for x in nodes)} holding a membership of another size "
                  f"({sorted({len(x.hosts) for x in nodes if len(x.hosts) != x.n})[:5]})", file=sys.stderr, flush=True)  # fmt: skip
        if phase == "register" and not sent_at and not any(x.client.want_write() for x in nodes):
            sent_at = time.monotonic()  # every request of the burst handed to the kernel
        if phase == "register" and not done_sent and all(x.complete_at for x in nodes):
            conn.send(("done", *_storm_report(nodes, signatures, sent_at)))
            done_sent = True
        if phase == "watch" and all(x.seen_at for x in watchers):
            conn.send(("seen", [x.seen_at for x in watchers], goodbye_at))
            phase = "steady"
        if now >= hb_next:  # like agents: heartbeat from the connection on, not only once registered
            seq += 1
            hb_next += hb_interval
            for node in nodes:
                if not node.left:
                    node.heartbeat(seq)
                if phase == "register" and node.reply_at is None and now - node.sent_at > RETRY_S:
                    node.sent_at = now
                    node.register()
    if not done_sent and sent_at:
        conn.send(("partial", *_storm_report(nodes, signatures, sent_at)))
    for node in nodes:
        node.client.disconnect()
        node.client.loop_write()


def _storm_report(nodes: list[SimNode], signatures: SignatureCheck, sent_at: float) -> tuple:
    """The fields of a Result after the status, for this worker's nodes."""
    return (
        max((x.reply_at for x in nodes if x.reply_at), default=0.0),
        max((x.complete_at for x in nodes if x.complete_at), default=0.0),
        sum(1 for x in nodes if not x.complete_at),
        signatures.checked == {Kind.SNAPSHOT, Kind.DELTA},
        sent_at,
        sum(x.stream_messages for x in nodes),
        sum(x.stream_bytes for x in nodes),
        max(x.stream_messages for x in nodes),
        max(x.stream_bytes for x in nodes),
    )


# ---- light nodes: raw MQTT 3.1.1, heartbeats only (--mode heartbeats) ----------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def mqtt_connect(client_id: str, username: str, password: str, keepalive: int = 60) -> bytes:
    """CONNECT (3.1.1, clean session, username and password)."""
    body = _mqtt_str("MQTT") + bytes([4, 0xC2]) + keepalive.to_bytes(2, "big")
    body += _mqtt_str(client_id) + _mqtt_str(username) + _mqtt_str(password)
    return b"\x10" + _varint(len(body)) + body


def mqtt_subscribe(packet_id: int, topic_filters: list[str]) -> bytes:
    """SUBSCRIBE at QoS 0."""
    body = packet_id.to_bytes(2, "big") + b"".join(_mqtt_str(t) + b"\x00" for t in topic_filters)
    return b"\x82" + _varint(len(body)) + body


def mqtt_publish(topic: str, payload: bytes) -> bytes:
    """PUBLISH at QoS 0, not retained."""
    body = _mqtt_str(topic) + payload
    return b"\x30" + _varint(len(body)) + body


def light_worker(indices: list[int], port: int, interval: float, conn) -> None:
    """One process of light nodes: log in, subscribe like an agent, then heartbeat every `interval`, spread
    evenly; drain and discard whatever the broker sends. Answers "count" with (heartbeats sent, connections
    closed by the broker), and "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    socks: list[socket.socket] = []
    for i in indices:
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(mqtt_connect(node_id(i), node_id(i), node_password(i)))
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                raise RuntimeError(f"{node_id(i)}: the broker closed the connection at login")
            connack += chunk
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"{node_id(i)}: the broker refused the login: {connack!r}")
        own_reply = topics.build(MESH, Kind.REPLY, node_id(i))
        sock.sendall(mqtt_subscribe(1, [topics.build(MESH, Kind.DELTA), topics.build(MESH, Kind.REGISTRAR), own_reply]))
        sock.setblocking(False)
        socks.append(sock)
    sel = selectors.DefaultSelector()
    for k, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, k)
    sel.register(conn, selectors.EVENT_READ, None)
    heartbeat_topics = [topics.build(MESH, Kind.HEARTBEAT, node_id(i)) for i in indices]
    conn.send("ready")
    start, sent, closed, n = time.monotonic(), 0, 0, len(socks)
    alive = [True] * n
    while True:
        due = int((time.monotonic() - start) / interval * n) + 1  # heartbeats due so far, node k at k/n of it
        while sent < due:
            k = sent % n
            if alive[k]:
                try:
                    socks[k].send(mqtt_publish(heartbeat_topics[k], heartbeat_payload(node_id(indices[k]), sent // n)))
                except BlockingIOError:
                    pass  # its socket buffer is full: the broker does not keep up (counted by the registrar)
            sent += 1
        wait = max(0.0, start + (sent / n) * interval - time.monotonic())
        for key, _ in sel.select(timeout=min(wait, 0.05)):
            if key.data is None:
                cmd = conn.recv()
                if cmd == "stop":
                    for k, sock in enumerate(socks):
                        if alive[k]:
                            try:
                                sock.send(b"\xe0\x00")  # DISCONNECT: no will
                            except OSError:
                                pass
                        sock.close()
                    return
                conn.send((sent, closed))  # "count"
            else:
                try:
                    if not key.fileobj.recv(65536):
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    alive[key.data] = False
                    closed += 1
                    sel.unregister(key.fileobj)
