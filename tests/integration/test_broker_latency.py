"""Request/response latency through each broker: a node publishes a register request, a registrar client answers
on the node's reply topic (the registration pattern). Prints the numbers (run with -s) and guards against the
~40-80 ms Nagle/delayed-ACK stalls that appear without TCP_NODELAY on either side."""

from __future__ import annotations

import statistics
import threading
import time

from brokers import ProbeClient

from meshcontract import topics
from meshcontract.topics import Kind

USERS = {"registrar": "r", "n1": "p"}
ROUNDS = 60


def test_request_reply_round_trip(any_broker):
    broker = any_broker(users=USERS)
    registrar = ProbeClient(broker, client_id="registrar", username="registrar", password="r")
    node = ProbeClient(broker, client_id="n1", username="n1", password="p")
    request, reply = topics.build("m1", Kind.REGISTER, "n1"), topics.build("m1", Kind.REPLY, "n1")
    registrar.client.on_message = lambda c, u, m: c.publish(reply, m.payload, qos=1)
    got = threading.Event()
    node.client.on_message = lambda c, u, m: got.set()
    assert registrar.subscribe(request) == 1
    assert node.subscribe(reply) == 1
    samples = []
    for i in range(ROUNDS):
        got.clear()
        start = time.perf_counter()
        node.client.publish(request, str(i), qos=1)
        assert got.wait(5)
        samples.append((time.perf_counter() - start) * 1000)
    samples = samples[10:]  # warm-up
    p50 = statistics.median(samples)
    p95 = statistics.quantiles(samples, n=20)[-1]
    print(f"{broker.kind}: request/reply round trip p50 {p50:.2f} ms, p95 {p95:.2f} ms over {len(samples)}")
    assert p50 < 20, samples
