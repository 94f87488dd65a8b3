"""How every component opens an MQTT connection: paho-mqtt, MQTT 3.1.1, TCP_NODELAY.

The only I/O here is creating and configuring a paho client; callers own connecting and the loop.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field

from meshcontract.errors import ContractError


class BrokerSettings(BaseModel):
    """Where and how to reach the broker. `url` is mqtt://host:port or mqtts://host:port."""

    model_config = ConfigDict(extra="forbid")

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    ca_file: str | None = None
    # Off only for a private CA that signs nothing but our own servers (the registrar's mesh CA): a certificate
    # that chains to it is ours under whatever name or address the broker was reached.
    verify_hostname: bool = True
    keepalive_s: int = Field(default=10, ge=2, le=3600)

    def host_port(self) -> tuple[str, int, bool]:
        """(host, port, tls) from the URL; ContractError if it is not an mqtt(s) URL."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ContractError(f"broker url must be mqtt://HOST:PORT or mqtts://HOST:PORT, got {self.url!r}")
        tls = parts.scheme == "mqtts"
        return parts.hostname, parts.port or (8883 if tls else 1883), tls


def _nodelay(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
    # Small request/response messages otherwise wait on Nagle + delayed ACK: ~85 ms -> ~1 ms on loopback.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # a TLS-wrapped or non-TCP socket: nothing to tune
        pass


def make_client(
    settings: BrokerSettings,
    *,
    client_id: str,
    clean_session: bool = True,
    client_class: Callable[..., mqtt.Client] = mqtt.Client,
) -> mqtt.Client:
    """A configured (not yet connected) paho client speaking MQTT 3.1.1 with TCP_NODELAY on its socket.

    `client_class` builds the client object (paho's Client or a subclass, e.g. a test's fault injector).
    """
    _, _, tls = settings.host_port()
    client = client_class(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
    )
    client.on_socket_open = _nodelay
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if tls:
        context = ssl.create_default_context(cafile=settings.ca_file)
        context.check_hostname = settings.verify_hostname
        client.tls_set_context(context)
        if not settings.verify_hostname:
            client.tls_insecure_set(True)  # paho's own host name check, separate from the context's
    # Paho's own reconnect backoff; callers add jitter by choosing when to call reconnect themselves.
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def connect_async(client: mqtt.Client, settings: BrokerSettings) -> None:
    """Start connecting in paho's background thread; callbacks report the outcome."""
    host, port, _ = settings.host_port()
    client.connect_async(host, port, keepalive=settings.keepalive_s)
    client.loop_start()


def release(client: mqtt.Client) -> None:
    """Stop `client`'s network thread and close every socket it holds, once the caller is done with it.

    paho's loop_stop() leaves the socket pair it uses to wake its own loop open until the client is garbage
    collected (https://github.com/eclipse-paho/paho.mqtt.python/issues/627): an agent that reconnects for days
    would hold two file descriptors per past connection in between. Closing them here is the only place that
    reaches into paho's private state (pinned to paho-mqtt >=2.1,<3 in pyproject.toml).
    """
    client.loop_stop()
    reset = getattr(client, "_reset_sockets", None)
    if callable(reset):
        reset()
