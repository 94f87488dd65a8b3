"""The registrar's MQTT connection: one paho client whose callbacks only enqueue, and every publish it makes.

Nothing here decides anything. paho's network thread turns what the broker says into writer commands; the
writer thread calls the publishing methods with what it has decided and committed. Every topic is built by
meshcontract.topics and every payload is a meshcontract message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import paho.mqtt.client as mqtt

from meshcontract import messages, topics
from meshcontract.messages import RegisterReply, RegistrarStatus
from meshcontract.ratelimit import RateLimiter, RatePolicy
from meshcontract.signing import Signer
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings, connect_async, make_client, release
from registrar import commands, stream
from registrar.inbox import Inbox
from registrar.membership import Member, Membership
from registrar.metrics import Counters

log = logging.getLogger(__name__)

QOS_RELIABLE = 1
GOODBYE_WAIT_S = 3.0  # how long a stop waits for the broker to acknowledge our offline status
# What one node may send: a few registrations and statuses at once, and heartbeats at well above any interval a
# mesh would set (0.25 s here). Far beyond it is a flood.
NODE_RATE = RatePolicy(rate_per_s=20.0, burst=40.0, max_sources=200_000)


def _node_of(topic: str) -> str | None:
    # The last level of a per-node topic is the sender's node id (the broker lets a node publish only its own).
    parts = topic.rsplit("/", 1)
    return parts[1] if len(parts) == 2 and parts[1] else None


class BrokerLink:
    """The registrar's paho client for one mesh; `start()` connects in the background."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        mesh: str,
        instance: str,
        started_at: float,
        clock: Callable[[], float],
        inbox: Inbox,
        signer: Signer,
        node_rate: RatePolicy = NODE_RATE,
        counters: Counters | None = None,
        may_linger: Callable[[str], bool] | None = None,
    ) -> None:
        self.mesh = mesh
        self._signer = signer
        self._settings = settings
        self._instance = instance
        self._started_at = started_at
        self._clock = clock
        self._inbox = inbox
        self._client: mqtt.Client | None = None
        self._flood = RateLimiter(node_rate)  # only paho's network thread uses it
        self._dropped = 0
        self._counters = counters
        # Whether a heartbeat of this node may wait in the inbox (registrar.inbox): a hint, never a decision.
        self._may_linger = may_linger
        self._heartbeats = topics.subscription(mesh, Kind.HEARTBEAT).removesuffix("+")

    def start(self) -> None:
        """Create the client (with our offline status as its will) and start connecting."""
        # Client id = username, as for every account (the embedded broker refuses anything else; Mosquitto forces it).
        client = make_client(self._settings, client_id=self._settings.username or "registrar")
        client.will_set(
            topics.build(self.mesh, Kind.REGISTRAR), self._status("offline"), qos=QOS_RELIABLE, retain=True
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        # The one client every node waits for after a broker restart (registrations, the snapshot): retry often
        # instead of paho's default back-off, which left it ~4 s behind the agents after a 3 s outage.
        client.reconnect_delay_set(min_delay=0.25, max_delay=2.0)
        # Do not let paho drop our QoS 1 publishes when a burst fills its in-flight window.
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        self._client = client
        connect_async(client, self._settings)

    # ---- paho callbacks (paho's network thread): enqueue only -----------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the registrar: %s", reason_code)
            return
        self._inbox.put(commands.Connected())

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._inbox.put(commands.Disconnected(str(reason_code)))

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        # Fairness before the single writer's queue: one node flooding (junk or valid-looking heartbeats) once
        # left 1 of 15 other nodes' registrations answered within 5 s. Each node gets a budget; what exceeds
        # it is dropped here, counted, and never costs the writer anything.
        node = _node_of(msg.topic)
        if node is not None and not self._flood.allow(node, now=time.monotonic()):
            self._dropped += 1
            if self._counters is not None:
                self._counters.add("flood_dropped")
            if self._dropped % 1000 == 1:
                log.warning("dropping messages of a node over its rate (%d so far)", self._dropped,
                            extra={"node_id": node})  # fmt: skip
            return
        message = commands.Message(msg.topic, msg.payload)
        # A heartbeat of an active member only moves its last_seen: it may wait to be read with others. Any other
        # (a revival, an unknown sender) is decided at once, as is every other kind; the order stays one.
        if node is not None and self._may_linger is not None and msg.topic.startswith(self._heartbeats) \
                and self._may_linger(node):  # fmt: skip
            self._inbox.put_lingering(message)
        else:
            self._inbox.put(message)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._inbox.put(commands.Subscribed())

    # ---- publishing (the writer thread) ---------------------------------------------------------------------

    def reply(self, node_id: str, reply: RegisterReply) -> None:
        """Answer a registration on reply/<node> (not retained: only the waiting node cares), signed."""
        if self._client is not None:
            self._client.publish(
                topics.build(self.mesh, Kind.REPLY, node_id), self._signed(reply, Kind.REPLY), qos=QOS_RELIABLE
            )

    def records(self, members: Mapping[str, Member], node_ids: Iterable[str]) -> None:
        """Observers' view: each node's retained record, or its tombstone (and its status cleared) if it is gone.

        Agents do not read these (they follow the signed snapshot and deltas); mosquitto_sub does.
        """
        for node in node_ids:
            member = members.get(node)
            if member is not None:
                self._retain(topics.build(self.mesh, Kind.MEMBERS, node), messages.encode(member.record()))
            else:
                self._retain(topics.build(self.mesh, Kind.MEMBERS, node), b"")
                # Its retained status would otherwise linger for every observer.
                self._retain(topics.build(self.mesh, Kind.STATUS, node), b"")

    def changes(self, membership: Membership, *, from_revision: int, changed: Iterable[str]) -> None:
        """Publish what changed since `from_revision`: the signed delta for agents in sync, then the signed
        retained snapshot for agents (re)synchronising, then the observers' records. In this order on one
        connection at QoS 1, so an agent that sees the delta can never find an older snapshot after it."""
        changed = sorted(set(changed))
        delta = stream.delta(membership, mesh=self.mesh, from_revision=from_revision, changed=changed, now=self._clock())
        if delta is not None:
            self._publish(topics.build(self.mesh, Kind.DELTA), self._signed(delta, Kind.DELTA), retain=False)
        self.snapshot(membership)
        self.records(membership.members, changed)

    def snapshot(self, membership: Membership) -> None:
        """Publish the signed, retained snapshot of the whole membership."""
        snap = stream.snapshot(membership, mesh=self.mesh, now=self._clock())
        self._publish(topics.build(self.mesh, Kind.SNAPSHOT), self._signed(snap, Kind.SNAPSHOT), retain=True)

    def _signed(self, message, kind: Kind) -> bytes:
        sig = self._signer.sign(message, kind=str(kind), mesh=self.mesh)
        return messages.encode(message.model_copy(update={"sig": sig}))

    def announce(self, membership: Membership, *, from_revision: int, changed: Iterable[str]) -> None:
        """On every (re)connection: publish what changed while away and the snapshot, every record for
        observers, then subscribe. We say we are online once the broker confirms the subscriptions (`online`).

        The broker may have lost its retained messages (a restart without persistence): they are ours to restore.
        """
        assert self._client is not None
        self.changes(membership, from_revision=from_revision, changed=changed)
        self.records(membership.members, sorted(membership.members))
        self._client.subscribe(
            [
                (topics.subscription(self.mesh, Kind.REGISTER), QOS_RELIABLE),
                (topics.subscription(self.mesh, Kind.STATUS), QOS_RELIABLE),
                (topics.subscription(self.mesh, Kind.HEARTBEAT), 0),
                (topics.subscription(self.mesh, Kind.MEMBERS), QOS_RELIABLE),
            ]
        )

    def online(self) -> None:
        """Say we are online (retained), once subscribed: agents send their requests as soon as they read it,
        and a request published before our subscription exists reaches nobody (found by the chaos bench: an
        agent waited 5 s for the reply, then its backoff, after every registrar restart it raced)."""
        self._retain(topics.build(self.mesh, Kind.REGISTRAR), self._status("online"))

    def goodbye(self, *, connected: bool) -> None:
        """A graceful stop: publish our offline status (retained) and wait for the broker to take it, disconnect."""
        if self._client is None:
            return
        if connected:
            info = self._client.publish(
                topics.build(self.mesh, Kind.REGISTRAR), self._status("offline"), qos=QOS_RELIABLE, retain=True
            )
            try:
                info.wait_for_publish(GOODBYE_WAIT_S)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
        # Also when not connected: it ends paho's reconnect wait, so close() returns at once.
        self._client.disconnect()

    def close(self) -> None:
        """Stop paho's network thread and close its sockets."""
        if self._client is not None:
            release(self._client)

    def _retain(self, topic: str, payload: bytes) -> None:
        self._publish(topic, payload, retain=True)

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        assert self._client is not None
        self._client.publish(topic, payload, qos=QOS_RELIABLE, retain=retain)

    def _status(self, state: str) -> bytes:
        return messages.encode(
            RegistrarStatus(state=state, instance=self._instance, started_at=self._started_at, at=self._clock())
        )
