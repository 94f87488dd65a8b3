"""What the control plane sends the session: its subscriptions, each message checked, then handed on.

paho's network thread calls `Inbound.handle` for every message (it must never block). Each one is decoded and
the registrar's signature checked first: anyone allowed to publish on a topic (a broker, a stolen registrar
login) could put a made-up membership, address or setting there. Then:
  - reply/<node>         -> the registration exchange's ReplyBox (nodeagent.registration)
  - snapshot and deltas  -> the shared MeshState and its pure follower (nodeagent.membership). While it is
    syncing (a new connection, a missed delta) the retained snapshot's subscription is held; once in sync it is
    dropped, so a steady agent receives only deltas.
  - the registrar status -> whether the registrar is online (the ReplyBox: a restart cuts a wait short)
A message that fails a check is dropped with the reason logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt

from meshcontract import messages, topics
from meshcontract.errors import ContractError
from meshcontract.messages import MembershipDelta, MembershipSnapshot, RegisterReply, RegistrarStatus
from meshcontract.signing import Verifier
from meshcontract.topics import Kind
from nodeagent.connection import Connection
from nodeagent.membership import Applied
from nodeagent.meshstate import MeshState
from nodeagent.registration import Fields, ReplyBox

log = logging.getLogger(__name__)


def verified_reply(payload: bytes, verifier: Verifier, *, mesh: str) -> RegisterReply:
    """A registration reply from reply/<node>, signed by the registrar; ContractError otherwise (a broker could
    publish there, and would hand us a made-up address or settings)."""
    reply = messages.decode(RegisterReply, payload)
    verifier.verify(reply, kind=str(Kind.REPLY), mesh=mesh)
    return reply


class Inbound:
    """The session's subscriptions and what arrives on them: `subscribe(conn, ...)` once a connection is up,
    `handle(conn, msg)` for each message on it."""

    def __init__(
        self,
        *,
        mesh_name: str,
        state: MeshState,
        verifier: Verifier,
        replies: ReplyBox,
        on_membership_changed: Callable[[], None],
        fields: Fields,
    ) -> None:
        self._mesh_name = mesh_name
        self._state = state
        self._verifier = verifier
        self._replies = replies
        self._on_membership_changed = on_membership_changed
        self._fields = fields

    def _topic(self, kind: Kind, node: str | None = None) -> str:
        return topics.build(self._mesh_name, kind, node)

    def subscribe(self, conn: Connection, *, node_id: str) -> None:
        """Subscribe `conn` to our replies, the membership stream and the registrar's status."""
        # Deltas may have been missed while we were away: follow them again from the retained snapshot.
        self._state.resync()
        subscriptions = [
            (self._topic(Kind.REPLY, node_id), 1),
            (self._topic(Kind.DELTA), 1),
            (self._topic(Kind.REGISTRAR), 1),
            (self._topic(Kind.SNAPSHOT), 1),
        ]
        conn.snapshot_subscribed = True
        conn.subscriptions = [topic for topic, _ in subscriptions]
        _, conn.sub_mid = conn.client.subscribe(subscriptions)

    def handle(self, conn: Connection, msg: mqtt.MQTTMessage) -> None:
        """One message that arrived on `conn` (paho's network thread: never blocks)."""
        try:
            topic = topics.parse(msg.topic)
            if topic.mesh != self._mesh_name:
                return
            if topic.kind is Kind.REPLY:
                self._replies.deliver(verified_reply(msg.payload, self._verifier, mesh=self._mesh_name))
            elif topic.kind is Kind.SNAPSHOT:
                snapshot = self._verified(MembershipSnapshot, msg.payload, Kind.SNAPSHOT)
                self._followed(conn, self._state.apply_snapshot(snapshot), snapshot.revision)
            elif topic.kind is Kind.DELTA:
                delta = self._verified(MembershipDelta, msg.payload, Kind.DELTA)
                self._followed(conn, self._state.apply_delta(delta), delta.to_revision)
            elif topic.kind is Kind.REGISTRAR:
                self._on_registrar(messages.decode(RegistrarStatus, msg.payload), retained=msg.retain)
        except ContractError as exc:
            log.warning("dropping message on %s: %s", msg.topic, exc, extra=self._fields())

    def _verified(self, model, payload: bytes, kind: Kind):
        """Decode a membership message and check the registrar's signature on it (ContractError if bad)."""
        message = messages.decode(model, payload, max_size=messages.MAX_MEMBERSHIP_PAYLOAD)
        if message.mesh != self._mesh_name:
            raise ContractError(f"{kind} for mesh {message.mesh!r} on our mesh's topic")
        self._verifier.verify(message, kind=str(kind), mesh=self._mesh_name)
        return message

    def _followed(self, conn: Connection, result: Applied, revision: int) -> None:
        if result is Applied.GAP:
            log.info("missed a membership delta before revision %s: resyncing from the snapshot", revision)
        syncing = self._state.syncing
        # Hold the snapshot subscription exactly while syncing. Subscribing again delivers the retained one.
        if syncing != conn.snapshot_subscribed and not conn.lost.is_set():
            snapshot = self._topic(Kind.SNAPSHOT)
            if syncing:
                conn.client.subscribe(snapshot, qos=1)
            else:
                conn.client.unsubscribe(snapshot)
            conn.snapshot_subscribed = syncing
        if result in (Applied.ADOPTED, Applied.APPLIED):
            self._on_membership_changed()

    def _on_registrar(self, status: RegistrarStatus, *, retained: bool) -> None:
        online = status.state == "online"
        was = self._replies.registrar_status(online=online, retained=retained)
        if was != online:
            log.info("registrar is %s", status.state, extra=self._fields())
