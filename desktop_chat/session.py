"""One chat node: history, the peer directory, the listener and message delivery, composed. No Qt here.

The window and the headless `listen` command both drive a ChatSession; changes to messages are announced
to subscribers (from whichever thread made them), so the window can forward them to its own thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable

from desktop_chat.errors import ChatError, DeliveryError, PeerSourceError
from desktop_chat.framing import MAX_TEXT, ChatMessage
from desktop_chat.history import HistoryStore, Record
from desktop_chat.peers import PeerDirectory, PeerSnapshot, PeerSource
from desktop_chat.transport import ChatServer, send_message

log = logging.getLogger(__name__)

Listener = Callable[[Record], None]


def check_text(text: str) -> None:
    """ChatError unless `text` can be sent: not blank, at most MAX_TEXT characters. No I/O here."""
    if not text.strip():
        raise ChatError("empty message")
    if len(text) > MAX_TEXT:
        raise ChatError(f"message longer than {MAX_TEXT} characters")


class ChatSession:
    """Sends, receives and remembers messages for this node.

    `bind` overrides the listen/source address (tests on loopback); otherwise both are our mesh IP as the
    agent reports it. `name` is sent with each message for display; default the agent's name for us.
    """

    def __init__(
        self,
        *,
        history: HistoryStore,
        directory: PeerDirectory,
        port: int,
        timeout: float = 5.0,
        name: str | None = None,
        bind: str | None = None,
        clock: Callable[[], float] = time.time,
        send: Callable[..., None] = send_message,
    ) -> None:
        self.history = history
        self.directory = directory
        self.port = port
        self.timeout = timeout
        self._name = name
        self._bind = bind
        self._clock = clock
        self._send = send
        self._listeners: list[Listener] = []
        self._server: ChatServer | None = None
        self._server_lock = threading.Lock()
        self._workers: set[threading.Thread] = set()

    @property
    def name(self) -> str:
        """Our display name: the configured one, else the agent's name for us, else the host name."""
        if self._name:
            return self._name
        snap = self.directory.snapshot
        return (snap.self_name if snap and snap.self_name else socket.gethostname())[:63]

    @property
    def local_ip(self) -> str | None:
        """The address we listen on and send from: the bind override, else our mesh IP (None if unknown)."""
        if self._bind:
            return self._bind
        snap = self.directory.snapshot
        return snap.self_ip if snap else None

    @property
    def listening(self) -> tuple[str, int] | None:
        """The (ip, port) we listen on, or None."""
        with self._server_lock:
            return self._server.address if self._server else None

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(record)` whenever a message is added or changes (from any thread)."""
        self._listeners.append(listener)

    def _notify(self, record: Record) -> None:
        for listener in self._listeners:
            listener(record)

    def ensure_listening(self) -> tuple[str, int] | None:
        """Listen on local_ip (restarting if it changed); the address, or None while it is unknown.

        ListenError if the address cannot be bound (e.g. the mesh interface is not up yet).
        """
        ip = self.local_ip
        with self._server_lock:
            if self._server is not None and self._server.address[0] == ip:
                return self._server.address
            if self._server is not None:
                log.info("our mesh IP changed from %s to %s: moving the chat listener", self._server.address[0], ip,
                         extra={"mesh_ip": ip})
                self._server.stop()
                self._server = None
            if ip is None:
                return None
            server = ChatServer(bind=ip, port=self.port, is_member=self.directory.is_member,
                                on_message=self._on_incoming)
            server.start()
            self._server = server
            return server.address

    def _on_incoming(self, from_ip: str, msg: ChatMessage) -> None:
        record = Record(peer_ip=from_ip, msg_id=msg.id, direction="in", name=msg.from_name, text=msg.text,
                        sent_at=msg.sent_at, status="received", read=False)
        if not self.history.add(record):
            # A retry after a lost ack: stored already, ack again but show nothing new.
            log.info("duplicate message %s from %s acknowledged again", msg.id, from_ip, extra={"mesh_ip": from_ip})
            return
        log.info("message %s received from %s", msg.id, from_ip, extra={"mesh_ip": from_ip, "node_name": msg.from_name})
        self._notify(self.history.get(from_ip, msg.id) or record)

    def _new_record(self, peer_ip: str, text: str) -> Record:
        check_text(text)
        record = Record(peer_ip=peer_ip, msg_id=uuid.uuid4().hex, direction="out", name=self.name, text=text,
                        sent_at=self._clock(), status="sending")
        self.history.add(record)
        return self.history.get(peer_ip, record.msg_id) or record

    def _deliver(self, record: Record) -> Record:
        msg = ChatMessage(record.msg_id, record.name, record.sent_at, record.text)
        try:
            self._send(record.peer_ip, self.port, msg, timeout=self.timeout, source_ip=self.local_ip)
        except DeliveryError as exc:
            log.warning("message %s to %s failed: %s", record.msg_id, record.peer_ip, exc.reason,
                        extra={"mesh_ip": record.peer_ip})
            updated = self.history.set_status(record.peer_ip, record.msg_id, "failed", exc.reason)
        else:
            log.info("message %s delivered to %s", record.msg_id, record.peer_ip, extra={"mesh_ip": record.peer_ip})
            updated = self.history.set_status(record.peer_ip, record.msg_id, "delivered")
        updated = updated or record
        self._notify(updated)
        return updated

    def _deliver_in_background(self, record: Record) -> None:
        def run() -> None:
            try:
                self._deliver(record)
            finally:
                self._workers.discard(threading.current_thread())

        worker = threading.Thread(target=run, name=f"chat-send-{record.msg_id[:8]}", daemon=True)
        self._workers.add(worker)
        worker.start()

    def send(self, peer_ip: str, text: str) -> Record:
        """Store a message to `peer_ip` as `sending` and deliver it in the background; the new record."""
        record = self._new_record(peer_ip, text)
        self._notify(record)
        self._deliver_in_background(record)
        return record

    def send_now(self, peer_ip: str, text: str) -> Record:
        """Store and deliver a message, waiting for the outcome; the final record (delivered or failed)."""
        return self._deliver(self._new_record(peer_ip, text))

    def retry(self, peer_ip: str, msg_id: str) -> Record:
        """Send a failed message again with the same id (the receiver drops a duplicate); the record."""
        record = self.history.get(peer_ip, msg_id)
        if record is None or record.direction != "out":
            raise ChatError(f"no outgoing message {msg_id} to {peer_ip}")
        if record.status != "failed":
            raise ChatError(f"message {msg_id} is {record.status}, only failed messages are retried")
        record = self.history.set_status(peer_ip, msg_id, "sending") or record
        self._notify(record)
        self._deliver_in_background(record)
        return record

    def close(self, *, wait: float = 0.0) -> None:
        """Stop listening; optionally wait up to `wait` seconds for deliveries in flight."""
        with self._server_lock:
            if self._server is not None:
                self._server.stop()
                self._server = None
        deadline = time.monotonic() + wait
        for worker in list(self._workers):
            worker.join(timeout=max(0.0, deadline - time.monotonic()))


class PeerPoller:
    """Reads the peer source every `interval` seconds in a thread and updates the directory.

    `on_update(snapshot, error)` is called after each poll from the poller thread: the newest snapshot
    (the last good one if the agent did not answer) and the error text or None.
    """

    def __init__(
        self,
        source: PeerSource,
        directory: PeerDirectory,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        on_update: Callable[[PeerSnapshot | None, str | None], None] | None = None,
    ) -> None:
        self._source = source
        self._directory = directory
        self._interval = interval
        self._clock = clock
        self._on_update = on_update
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        # Weakly: the directory (shared with the session and its server threads) must not keep the poller, and
        # through its on_update the window, alive after the window is gone.
        refresh = weakref.WeakMethod(self.refresh_directory)
        directory.set_refresher(lambda: (method := refresh()) is not None and method())

    def refresh_directory(self) -> None:
        """Read the agent once more and update the directory, nothing else (the chat server's check on a miss)."""
        try:
            self._directory.update(self._source.snapshot(now=self._clock()))
        except PeerSourceError as exc:
            log.debug("cannot read peers from the agent on a miss: %s", exc)

    def poll_once(self) -> tuple[PeerSnapshot | None, str | None]:
        """One poll: update the directory; (snapshot, error)."""
        error = None
        try:
            self._directory.update(self._source.snapshot(now=self._clock()))
            if self._last_error is not None:
                log.info("agent answering again")
        except PeerSourceError as exc:
            error = str(exc)
            if error != self._last_error:
                log.warning("cannot read peers from the agent (keeping the last list, if any): %s", error)
        self._last_error = error
        snapshot = self._directory.snapshot
        if self._on_update is not None:
            self._on_update(snapshot, error)
        return snapshot, error

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="chat-peer-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            # Event.wait doubles as the poll interval and an immediate wake-up on stop().
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
