"""An MQTT client for a test to drive inside a network namespace: run this file there, talk JSON lines to it.

A lab's broker listens only on the lab's underlay, inside its control namespace, so a test that wants to be a
broker client there (an observer, or an attacker with stolen rights) runs this script in that namespace:

    ip netns exec CTL python nsmqtt.py    # stdin: one JSON command a line; stdout: one JSON event a line

    {"op": "connect", "host", "port", "ca", "username", "password"}  -> {"event": "connack", "rc"}
    {"op": "subscribe", "filters": [...]}                            -> {"event": "suback", "granted": [...]}
    {"op": "publish", "topic", "payload" (base64), "retain"}         -> {"event": "puback", "mid"}
    {"op": "close"}                                                  -> the process exits
and, as they happen, {"event": "message", "topic", "payload" (base64), "retain"} and
{"event": "disconnected"}. Standard library and paho only.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import threading

import paho.mqtt.client as mqtt

_out = threading.Lock()


def emit(**event: object) -> None:
    with _out:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def main() -> int:
    client: mqtt.Client | None = None
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "connect":
            # Client id = username: the embedded broker refuses anything else, Mosquitto forces it.
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=command["username"], protocol=mqtt.MQTTv311,
                reconnect_on_failure=False,
            )  # fmt: skip
            client.username_pw_set(command["username"], command["password"])
            context = ssl.create_default_context(cafile=command["ca"])
            context.check_hostname = False  # the registrar's private CA signs nothing but its own servers
            client.tls_set_context(context)
            client.on_connect = lambda c, u, f, rc, p: emit(event="connack", rc=rc.value)
            client.on_subscribe = lambda c, u, mid, rcs, p: emit(
                event="suback", granted=[rc.value for rc in rcs]
            )
            client.on_publish = lambda c, u, mid, rc, p: emit(event="puback", mid=mid)
            client.on_message = lambda c, u, m: emit(
                event="message",
                topic=m.topic,
                payload=base64.b64encode(m.payload).decode(),
                retain=bool(m.retain),
            )
            client.on_disconnect = lambda *a: emit(event="disconnected")
            client.connect(command["host"], command["port"], keepalive=10)
            client.loop_start()
        elif op == "subscribe":
            assert client is not None
            client.subscribe([(f, 1) for f in command["filters"]])
        elif op == "publish":
            assert client is not None
            payload = base64.b64decode(command["payload"])
            client.publish(command["topic"], payload, qos=1, retain=command.get("retain", False))
        elif op == "close":
            break
    if client is not None:
        client.disconnect()
        client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
