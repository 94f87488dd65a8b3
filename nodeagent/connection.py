"""One MQTT connection of the control-plane session: its paho client, its epoch and what happened on it so far.

The session (nodeagent.session) makes one per connection attempt; the registration exchange
(nodeagent.registration) and the inbound messages (nodeagent.inbound) act on the one they are handed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

# How every connection's paho client is made; tests pass one that can inject faults (tests/faults.py).
ClientFactory = Callable[..., mqtt.Client]


@dataclass
class Connection:
    """One MQTT connection attempt and what happened on it so far."""

    client: mqtt.Client
    epoch: int
    connected: threading.Event
    subscribed: threading.Event
    lost: threading.Event
    sub_mid: int | None = None
    auth_refused: bool = False  # the broker refused our credential (CONNACK "not authorized")
    snapshot_subscribed: bool = False
    subscriptions: list[str] = field(default_factory=list)
