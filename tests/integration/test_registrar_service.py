"""The service's single writer without a broker: bursts larger than one group commit lose nothing."""

from __future__ import annotations

import base64
import json
import time

from brokers import free_port

from meshcontract import topics
from meshcontract.messages import MeshSettings
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings
from registrar import engine, service
from registrar.membership import LivenessPolicy
from registrar.store import MemoryStore


def test_burst_larger_than_a_batch_is_fully_applied():
    config = engine.Config(
        mesh=MeshSettings(
            mesh="lab",
            network="10.9.0.0/16",
            heartbeat_interval_s=1,
            heartbeat_ttl_s=5,
            persistent_keepalive_s=0,
            mtu=1420,
        ),
        policy=LivenessPolicy(ttl_s=5, expiry_s=60, grace_s=6),
        require_token=False,
    )
    store = MemoryStore()
    svc = service.RegistrarService(
        config=config,
        store=store,
        broker=BrokerSettings(url=f"mqtt://127.0.0.1:{free_port()}"),  # nobody listens: replies go nowhere
        network="10.9.0.0/16",
        quarantine_s=60,
    )
    svc.start()
    try:
        n = service.MAX_BATCH * 2 + 37
        for i in range(n):
            body = {
                "request_id": f"burst-{i:05d}",
                "node_id": f"n{i}",
                "name": f"n{i}",
                "public_key": base64.b64encode(i.to_bytes(4, "big") * 8).decode(),
                "listen_port": 51820,
                "epoch": 1,
            }
            # what paho's on_message does: enqueue only
            svc._on_message(
                None, None, _Msg(topics.build("lab", Kind.REGISTER, f"n{i}"), json.dumps(body).encode())
            )
        deadline = time.monotonic() + 30
        while len(svc.state.membership.members) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(svc.state.membership.members) == n
        assert len(store.members) == n and store.revision == n
        assert store.commits < n  # group commit: far fewer transactions than registrations
        ips = [m.mesh_ip for m in svc.state.membership.members.values()]
        assert len(set(ips)) == n
    finally:
        svc.stop()


class _Msg:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload
