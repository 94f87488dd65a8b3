"""Issue 11: someone with the registrar's broker rights answers a registration in the registrar's place.

A RegisterReply sets the node's address, prefix, MTU and the route to the mesh network. Unsigned, one forged
reply on reply/<node> made a registering agent add 100.96.0.77/1 to its interface and route 0.0.0.0/0 into
the mesh (its whole traffic), with MTU 576 and a heartbeat interval of an hour. Replies are signed by the
registrar now, like the membership: a forged one (unsigned, or signed by another key) is dropped with the
reason logged, and the genuine reply that follows is taken as before.
"""

from __future__ import annotations

import logging

import pytest
from brokers import ProbeClient, RunningBroker
from harness import IFNAME, MESH, REGISTRAR_PASSWORD, Mesh, Registrar
from polling import wait_for

from meshcontract import topics
from meshcontract.messages import MeshSettings, RegisterReply, RegisterRequest, decode, encode
from meshcontract.signing import Signer
from meshcontract.topics import Kind


def test_a_forged_register_reply_changes_nothing(
    mesh: Mesh, broker: RunningBroker, registrar: Registrar, caplog: pytest.LogCaptureFixture
) -> None:
    node = mesh.add("alpha")
    mesh.wait_complete()
    genuine_ip = node.running.mesh_ip
    machine = (node.routes.addresses(IFNAME), node.routes.routes(), node.routes.link(IFNAME))
    registrar.kill()  # the attacker answers in its place
    mesh.stop("alpha")
    attacker = ProbeClient(broker, client_id="registrar", username="registrar", password=REGISTRAR_PASSWORD)
    try:
        assert attacker.subscribe(topics.subscription(MESH, Kind.REGISTER)) == 1
        caplog.set_level(logging.WARNING, logger="nodeagent.inbound")
        agent = mesh.start("alpha")
        register = topics.build(MESH, Kind.REGISTER, agent.node_id)
        request = decode(RegisterRequest, attacker.expect(register, timeout=15).payload)
        settings = MeshSettings(
            mesh=MESH, network="0.0.0.0/0", heartbeat_interval_s=3600, heartbeat_ttl_s=86400,
            persistent_keepalive_s=0, mtu=576,
        )  # fmt: skip
        forged = RegisterReply(
            request_id=request.request_id, ok=True, node_id=request.node_id, mesh_ip="100.96.0.77",
            prefix_len=1, settings=settings,
        )  # fmt: skip
        other_key = Signer.generate().sign(forged, kind=str(Kind.REPLY), mesh=MESH)
        reply_topic = topics.build(MESH, Kind.REPLY, agent.node_id)
        for sig in ("", other_key):
            attacker.publish(reply_topic, encode(forged.model_copy(update={"sig": sig})))

        def dropped() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if f"dropping message on {reply_topic}" in r.getMessage()
            ]

        wait_for(
            lambda: len(dropped()) >= 2 or agent.mesh_ip != genuine_ip, what="both forged replies handled"
        )
    finally:
        attacker.close()
    assert agent.mesh_ip == genuine_ip
    assert (node.routes.addresses(IFNAME), node.routes.routes(), node.routes.link(IFNAME)) == machine
    assert ["unsigned reply" in m for m in dropped()] == [True, False]
    assert "reply: bad signature" in dropped()[1]
    # The registrar is back: its (signed) reply is taken, and the machine is as it was.
    registrar.start()
    wait_for(lambda: agent.status().ready, timeout=20, what="alpha registered with the genuine registrar")
    mesh.wait_complete()
    assert agent.mesh_ip == genuine_ip
    assert (node.routes.addresses(IFNAME), node.routes.routes(), node.routes.link(IFNAME)) == machine
