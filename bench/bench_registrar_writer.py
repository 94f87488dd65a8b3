"""What the registrar's writer spends per input at N members, without a broker: a liveness tick and a heartbeat.

    python bench/bench_registrar_writer.py [--members 10000] [--repeat 20]

- A tick when nobody is due (the steady state): the full scan of every member (registrar.liveness.tick without
  candidates, what every tick did before the deadline queue) against the deadline queue's (registrar.deadlines).
- A heartbeat of an active member: engine.handle_message one at a time (a copy of the member table each, what
  the writer did before registrar.batch) against batch.decide over a round of one heartbeat with the refresh
  set aside, as the writer now runs it when heartbeats arrive one by one, and over rounds of 256.

Prints one JSON object; times are the best of --repeat runs, in microseconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from meshcontract.messages import Endpoint, MeshSettings  # noqa: E402
from registrar import engine  # noqa: E402
from registrar import liveness as lv  # noqa: E402
from registrar import membership as ms  # noqa: E402
from registrar.batch import Incoming, decide, refresh  # noqa: E402
from registrar.deadlines import DeadlineQueue  # noqa: E402
from registrar.ipam import Ipam  # noqa: E402

NETWORK = "100.96.0.0/16"
POLICY = lv.LivenessPolicy(ttl_s=15, expiry_s=30 * 86400, grace_s=20)
CONFIG = engine.Config(
    mesh=MeshSettings(
        mesh="bench", network=NETWORK, heartbeat_interval_s=5, heartbeat_ttl_s=15, persistent_keepalive_s=25, mtu=1420
    ),
    policy=POLICY,
)


def best_us(fn, repeat: int, per: int = 1) -> float:
    """The fastest of `repeat` calls of `fn`, in microseconds per each of its `per` inputs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / per * 1e6


def mesh(n: int, *, now: float) -> engine.CoreState:
    """n active members at epoch 1, all heard at `now`."""
    state = ms.Membership.create(ipam=Ipam.create(NETWORK, quarantine_s=600), started_at=0.0)
    for i in range(n):
        key = base64.b64encode((i + 1).to_bytes(4, "big") * 8).decode()
        state = ms.admit(
            state, node_id=f"node{i:05d}", name=f"node{i:05d}", public_key=key,
            endpoints=(Endpoint(host="192.0.2.1", port=51820),), listen_port=51820, password_hash="x", now=now,
        ).state  # fmt: skip
    members = MappingProxyType({n: replace(m, epoch=1) for n, m in state.members.items()})
    return engine.CoreState(replace(state, members=members), MappingProxyType({}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    n, repeat, t0 = args.members, args.repeat, 1000.0
    core = mesh(n, now=t0)
    state, now = core.membership, t0 + 5
    queue = DeadlineQueue(POLICY)
    queue.rebuild(state.members, started_at=state.started_at)
    heartbeats = []
    for j in range(256):
        node = f"node{(j * 37) % n:05d}"
        payload = json.dumps({"v": 1, "node_id": node, "epoch": 1, "seq": 1, "sent_at": now}).encode()
        heartbeats.append(Incoming(f"meshvpn/v1/bench/heartbeat/{node}", payload, now))

    def one_at_a_time() -> None:
        s = core
        for m in heartbeats:
            s = engine.handle_message(s, m.topic, m.payload, now=m.now, config=CONFIG).state

    def rounds_of_one() -> None:
        s, pending = core, {}
        for i, m in enumerate(heartbeats):
            decided = decide(s, [m], config=CONFIG, pending=pending)
            s, pending = decided.state, decided.pending
            if i % 50 == 49:  # the writer applies what waits at least every 0.1 s: 50 of 2,000 a second
                s, pending = refresh(s, pending), {}

    figures = {
        "members": n,
        "tick_full_scan_us": round(best_us(lambda: lv.tick(state, now=now, policy=POLICY), repeat), 1),
        "tick_deadline_queue_us": round(
            best_us(lambda: lv.tick(state, now=now, policy=POLICY, candidates=queue.due(state, now=now)), repeat), 1
        ),
        "heartbeat_engine_one_at_a_time_us": round(best_us(one_at_a_time, repeat, len(heartbeats)), 1),
        "heartbeat_batch_rounds_of_one_us": round(best_us(rounds_of_one, repeat, len(heartbeats)), 1),
        "heartbeat_batch_rounds_of_256_us": round(
            best_us(lambda: decide(core, heartbeats, config=CONFIG), repeat, len(heartbeats)), 1
        ),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
