"""Fault injection for in-process agents, through the agent's one seam: the factory of its paho clients.

Production code carries no test hooks; a test passes `Faults().factory` as the agent's `client_factory` and
then cuts or silences the connection from outside:

    faults = Faults()
    agent = Agent(settings, wireguard=wg, routes=routes, client_factory=faults.factory)
    faults.pause_heartbeats()   # frozen or partitioned: still connected, no heartbeats (only the TTL notices)
    faults.crash(agent)         # killed: the TCP connection drops without DISCONNECT, nothing more is published
"""

from __future__ import annotations

import socket
import threading

import paho.mqtt.client as mqtt

from meshcontract.transport import BrokerSettings, make_client


class FaultyClient(mqtt.Client):
    """A paho client whose owner can drop heartbeats or sever it like a dying process would."""

    def __init__(self, faults: Faults, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._faults = faults

    def publish(self, topic, payload=None, qos=0, retain=False, properties=None):  # type: ignore[override]
        dropped = self._faults.severed.is_set() or (
            self._faults.heartbeats_paused.is_set() and "/heartbeat/" in topic
        )
        if dropped:
            # A message that never leaves: report it as done so callers waiting for a PUBACK do not stall.
            info = mqtt.MQTTMessageInfo(0)
            info.rc = mqtt.MQTT_ERR_SUCCESS
            info._set_as_published()
            return info
        return super().publish(topic, payload, qos, retain, properties)

    def disconnect(self, *args, **kwargs):  # type: ignore[override]
        if self._faults.severed.is_set():
            return mqtt.MQTT_ERR_SUCCESS  # a dead process sends no DISCONNECT: the broker publishes our will
        return super().disconnect(*args, **kwargs)


class Faults:
    """Switches for the clients an agent makes (every reconnection gets one from `factory`)."""

    def __init__(self) -> None:
        self.severed = threading.Event()
        self.heartbeats_paused = threading.Event()
        self._clients: list[FaultyClient] = []

    def factory(self, settings: BrokerSettings, *, client_id: str, clean_session: bool = True) -> mqtt.Client:
        """Drop-in for meshcontract.transport.make_client."""
        client = make_client(settings, client_id=client_id, clean_session=clean_session, client_class=self._make)
        self._clients.append(client)  # type: ignore[arg-type]
        return client

    def _make(self, *args, **kwargs) -> FaultyClient:
        return FaultyClient(self, *args, **kwargs)

    def pause_heartbeats(self, paused: bool = True) -> None:
        """Stop (or resume) heartbeats while staying connected: how a frozen node looks to the registrar."""
        if paused:
            self.heartbeats_paused.set()
        else:
            self.heartbeats_paused.clear()

    def crash(self, agent) -> None:
        """Kill `agent` as SIGKILL would: cut its TCP connection without DISCONNECT, publish nothing more, keep
        its interface and peers as they are, stop its threads."""
        self.severed.set()
        for client in self._clients:
            sock = client.socket()
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        agent.stop()
