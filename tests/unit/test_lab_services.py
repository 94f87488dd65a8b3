"""meshlab's pure parts around its services: reading `meshchat listen --json` events, the lab's Mosquitto config."""

from __future__ import annotations

import json

import pytest

from broker.mosquitto_config import render
from meshlab.chat import ReceivedMessage, parse_events, received_messages
from meshlab.controlplane import lab_mosquitto_config
from meshlab.plan import LabPlan

LISTENING = json.dumps({"event": "listening", "ip": "100.96.0.2", "port": 7800})
MESSAGE = json.dumps({"event": "message", "from_ip": "100.96.0.1", "name": "n1", "text": "hi\nthere",
                      "msg_id": "m1", "sent_at": 1.0})


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("", []),
        (LISTENING + "\n", ["listening"]),
        (LISTENING + "\n" + MESSAGE + "\n", ["listening", "message"]),
        (LISTENING + "\n" + MESSAGE[:20], ["listening"]),  # the last line is still being written
        ("meshchat: listening on 100.96.0.2:7800\n" + LISTENING + "\n", ["listening"]),  # not JSON: not an event
        ('{"level": "INFO", "msg": "x"}\n[1, 2]\n' + MESSAGE + "\n", ["message"]),  # JSON, but no event
        (json.dumps({"event": "later-kind", "x": 1}) + "\n", ["later-kind"]),
    ],
)
def test_parse_events(text, kinds):
    assert [e["event"] for e in parse_events(text)] == kinds


def test_received_messages_keep_order_and_exact_text():
    events = parse_events(LISTENING + "\n" + MESSAGE + "\n" + MESSAGE.replace("m1", "m2") + "\n")
    assert received_messages(events) == [ReceivedMessage("100.96.0.1", "n1", "hi\nthere")] * 2


def test_lab_mosquitto_config_is_the_shipped_one_on_the_underlay():
    plan = LabPlan("ab1")
    text = render(lab_mosquitto_config(plan, control_dir="/lab/control", plugin="/plugin.so"))
    lines = set(text.splitlines())
    assert {f"listener 1883 {plan.control_ip}", "certfile /lab/control/mosquitto/server.pem",
            "plugin /plugin.so", "plugin_opt_config_file /lab/control/mosquitto/dynamic-security.json",
            "user root", "log_dest file /lab/control/mosquitto.log", "allow_anonymous false"} <= lines
    # The limits the shipped config sets, which the lab's hand-written config once lacked.
    assert {"max_queued_messages 1000", "max_queued_bytes 67108864", "max_packet_size 4194304",
            "persistence false"} <= lines
