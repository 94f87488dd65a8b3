"""The embedded MQTT broker: amqtt 0.12.1, made correct for meshvpn, running in its own thread and event loop.

What we change in amqtt, each by overriding one method of `amqtt.broker.Broker` (the version is pinned in
pyproject.toml because these are private methods) — see docs/broker.md for the tests that show each bug:

1. Keepalive is not enforced: BrokerProtocolHandler.handle_read_timeout is empty
   (https://github.com/Yakifo/amqtt/issues/308), so a frozen or cut-off client stays "connected" forever and its
   will never fires. `_MeshHandler.handle_read_timeout` closes the connection after 1.5 x keepalive of silence,
   which publishes the will like any abnormal disconnect.
2. Session takeover: with clean_session=1, amqtt drops the old session but leaves the old connection running,
   and when that connection finally dies its will is published, e.g. "node offline" after the node's new
   connection said "online". With clean_session=0 it kicks the old connection but publishes the *new*
   connection's will. We disconnect the old connection ourselves and never publish its will.
3. Retained messages bypass the ACL: amqtt checks "receive" for live messages only; retained ones are sent on
   subscribe unchecked, and on every (re)connect it sends the retained messages matching *every* filter any
   client holds, to a client that may not have subscribed to anything. We send a retained message only for
   the client's own filters and only if it may receive it.
4. Authentication runs after amqtt has already acted on the CONNECT: it deletes the old session of that client
   id (clean_session=1) or overwrites its credentials and will (clean_session=0), so a CONNECT with a wrong
   password could make a connected node deaf. We decide admission first, before any session state changes.
5. Stopping a connection can hang: the reader's cancellation is lost when it coincides with an incoming packet
   (asyncio.wait_for on Python < 3.12, https://github.com/python/cpython/issues/86296), and amqtt then waits for
   the reader until the client goes away. A broker shutdown hit it while clients acknowledged the registrar's
   offline status. `_MeshHandler.stop` cancels again until the reader has stopped.
6. Shutdown leaves connections for the end of the event loop to cancel: the listener keeps accepting while
   amqtt ends its sessions, and a connection still reading its CONNECT is no session yet. On Python < 3.12 each
   cancelled connection task makes asyncio log a traceback. `MeshBroker.close` stops listening first, runs
   amqtt's shutdown, then closes the connections left.
7. A refused CONNECT over TLS logs a traceback: the client hangs up on reading the refusing CONNACK, amqtt's
   writer close then raises ConnectionResetError (as in its predecessor, https://github.com/njouanin/hbmqtt/issues/19)
   and nothing catches it, so asyncio logs "Unhandled exception in client_connected_cb" and the listener keeps
   counting the connection. `_close_refused` treats a peer that already hung up as closed.

Plus: TCP_NODELAY on accepted sockets (small request/response messages otherwise wait on Nagle).

Access rules are meshcontract.access, the same ones Mosquitto enforces through the dynamic security roles
registrar.accounts builds from them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, BrokerContext
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError
from amqtt.errors import BrokerError as AmqttBrokerError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.manager import PluginManager
from amqtt.session import Session
from amqtt.utils import gen_client_id

from broker import admission
from broker.errors import BrokerStartError
from broker.passwords import PasswordFile
from broker.settings import BrokerServerSettings
from meshcontract import access
from meshcontract.ratelimit import RateLimiter, RatePolicy

log = logging.getLogger(__name__)
_SHUTDOWN_TIMEOUT_S = 3.0

_TAKEOVER_WAIT_S = 5.0
_ACCOUNT_CHECK_S = 1.0  # how soon a session whose account was deleted from the password file is dropped
_CANCEL_AGAIN_S = 0.1  # a reader still running this long after its cancellation has lost it (see _MeshHandler.stop)
_CONNECT_WAIT_S = 1.0  # at shutdown, how long connections that were still logging in get to end
_START_TIMEOUT_S = 15.0


class PacketTooLarge(Exception):
    """A client sent a packet larger than the broker accepts: its connection is closed."""


class _LimitedReader(ReaderAdapter):
    """A reader that refuses any read longer than `limit`.

    amqtt reads a packet's remaining length in one read (and a PUBLISH's payload in one more), so no read asks
    for more than the packet is long: refusing a long read refuses the packet before its bytes are buffered.
    amqtt has no packet size limit of its own (Mosquitto: max_packet_size).
    """

    def __init__(self, inner: ReaderAdapter, limit: int) -> None:
        self.inner = inner
        self._limit = limit

    async def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._limit:
            raise PacketTooLarge(f"packet of more than {self._limit} bytes")
        return await self.inner.read(n)

    def feed_eof(self) -> None:
        self.inner.feed_eof()


class _MeshHandler(BrokerProtocolHandler):
    """amqtt's per-connection protocol handler, with keepalive enforced and packets bounded."""

    def __init__(
        self, plugins_manager: PluginManager[BrokerContext], loop: asyncio.AbstractEventLoop, *, max_packet: int
    ) -> None:
        super().__init__(plugins_manager, loop=loop)
        self.taken_over = False  # set when a newer connection with the same client id replaced this one
        self._timeout_task: asyncio.Task[None] | None = None
        self._max_packet = max_packet

    def attach(self, session: Session, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        # An oversized packet raises in the reader loop, which (like any error there) closes the connection.
        super().attach(session, _LimitedReader(reader, self._max_packet), writer)

    def handle_read_timeout(self) -> None:
        # amqtt's reader waits `session.keep_alive` seconds (set to 1.5 x the client's keepalive at CONNECT) for
        # the next packet, then calls this and keeps waiting; upstream does nothing here (amqtt#308). Report the
        # connection as closed: the broker then publishes the will and stops this handler.
        if self._timeout_task is not None or self.session is None:
            return
        log.info("client %s sent nothing for %.1fs: disconnecting it", self.session.client_id, self.session.keep_alive)
        self._timeout_task = asyncio.ensure_future(self.handle_connection_closed())

    async def stop(self) -> None:
        # amqtt stops a connection by cancelling its reader task once and waiting for it to end. The reader sits in
        # asyncio.wait_for(next packet), which on Python < 3.12 swallows a cancellation that coincides with the
        # packet it was waiting for (https://github.com/python/cpython/issues/86296): the reader reads on, and
        # stop() waits until the client itself goes away. A broker shutdown hits that window when clients are
        # acknowledging the registrar's offline status at that moment: the registrar's SIGTERM then hung until the
        # shutdown bound, and logged a CancelledError traceback (issue 13). So cancel until the reader has stopped.
        task = self._reader_task
        if task is not None and task is not asyncio.current_task():
            while not task.done() and not self._reader_stopped.is_set():
                task.cancel()
                stopped = asyncio.ensure_future(self._reader_stopped.wait())
                done, _ = await asyncio.wait([stopped], timeout=_CANCEL_AGAIN_S)
                if not done:
                    stopped.cancel()
        await super().stop()


async def _close_refused(writer: WriterAdapter, address: str, port: int) -> None:
    """Close a connection refused at CONNECT, when its client may already have hung up (fix 7).

    A client hangs up as soon as it reads the refusing CONNACK; over TLS amqtt's close then waits for the close
    of a socket the peer has reset and raises ConnectionResetError, which nothing in amqtt catches: asyncio
    logged "Unhandled exception in client_connected_cb" with a traceback for every refused login (a removed node
    retrying every few seconds), and the listener never released the connection. The refusal is already logged.
    """
    try:
        await writer.close()
    except ConnectionError as exc:
        log.debug("refused connection from %s:%s was already closed by the client: %r", address, port, exc)


@dataclass(eq=False)
class _Live:
    """One accepted connection, from admission until its message loop has ended."""

    handler: _MeshHandler
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class MeshBroker(Broker):
    """amqtt's Broker with meshvpn's admission, ACL and the fixes listed in the module docstring."""

    def __init__(
        self,
        config: dict,
        *,
        password_file: Path | None,
        allow_anonymous: bool,
        keepalive_factor: float,
        mesh: str | None,
        max_packet: int,
        login_rate: RatePolicy,
    ) -> None:
        super().__init__(config)
        self._passwords = PasswordFile(password_file) if password_file is not None else None
        self._allow_anonymous = allow_anonymous
        self._keepalive_factor = keepalive_factor
        self._mesh = mesh
        self._max_packet = max_packet
        # Failed logins per source address: a password guesser gets a few tries, then waits.
        self._failed_logins = RateLimiter(login_rate)
        # No credentials configured and anonymous allowed: an open broker without ACL, for quick tests.
        self.open_access = password_file is None and allow_anonymous
        self._live: dict[str, _Live] = {}
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}  # every accepted connection, until it ends

    # --- connection setup -------------------------------------------------------------------------------------

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            del self._connections[task]

    async def close(self, timeout: float) -> None:
        """Shut down and leave no connection behind for the event loop's end to cancel.

        On Python < 3.12 cancelling a connection's task makes asyncio's stream callback log a traceback: every
        connection must end by closing instead. amqtt's shutdown ends the sessions it knows, but its listener still
        accepts meanwhile (agents reconnect at once when dropped) and a connection whose CONNECT was still being
        read is no session yet. So: stop listening first, let amqtt shut down, then close whatever is left.
        """
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()
        try:
            # Bounded as a safety net; leaving the loop then cancels whatever amqtt left running.
            await asyncio.wait_for(self.shutdown(), timeout=timeout)
        except TimeoutError:
            log.warning("amqtt did not shut down within %.0f s; abandoning its remaining tasks", timeout)
        for writer in self._connections.values():
            writer.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=_CONNECT_WAIT_S)

    def _credentials_ok(self, username: str, password: str | bytes | None) -> bool:
        if password is None or self._passwords is None:
            return False
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        return self._passwords.check(username, password)

    async def watch_accounts(self, interval_s: float) -> None:
        """Drop the session of every account that left the password file (a removed node, a revoked observer),
        within `interval_s`: a deleted credential must not keep working until the client happens to reconnect."""
        if self._passwords is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            try:
                users = await asyncio.to_thread(self._passwords.users)
            except OSError as exc:
                log.warning("cannot re-read the password file: %s", exc)
                continue
            for username in [u for u in self._live if u not in users]:
                await self.disconnect(username)

    async def disconnect(self, username: str) -> bool:
        """Drop the live session of `username` (its account was deleted); its will is published as for any
        connection that ends without DISCONNECT. True if it had one."""
        live = self._live.get(username)
        if live is None:
            return False
        log.info("dropping the session of %s: its account was removed", username)
        await live.handler.handle_connection_closed()
        return True

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        # Replaces amqtt's version so that admission is decided before any session state changes (fix 4), an
        # existing connection is taken over without its will (fix 2) and keepalive is enforced (fix 1).
        try:
            _, incoming = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await _close_refused(writer, remote_address, remote_port)
            raise
        client_id = incoming.client_id or ""
        if not self.open_access:
            username = incoming.username
            now = time.monotonic()
            throttled = self._failed_logins.retry_after(remote_address, now=now) > 0
            ok = not throttled and username is not None and self._credentials_ok(username, incoming.password)
            if not ok and not throttled:
                self._failed_logins.allow(remote_address, now=now)  # a failed login costs from the allowance
            reason = "too many failed logins from this address" if throttled else admission.refusal(
                username=username,
                client_id=client_id,
                credentials_ok=ok,
                allow_anonymous=self._allow_anonymous,
                will_topic=incoming.will_topic if incoming.will_flag else None,
                mesh=self._mesh,
            )
            if reason is not None:
                log.warning("refused connection from %s:%s: %s", remote_address, remote_port, reason)
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await _close_refused(writer, remote_address, remote_port)
                raise MQTTError(f"connection refused: {reason}")

        if client_id in self._live:
            await self._take_over(client_id)

        # From here on as amqtt's Broker._initialize_client_session (0.12.1), plus will_retain which it forgets
        # to copy onto a resumed session.
        session = incoming
        if incoming.clean_session:
            if client_id:
                await self._delete_session(client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif client_id in self._sessions:
            session, _ = self._sessions[client_id]
            for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password"):
                setattr(session, attr, getattr(incoming, attr))
            session.parent = 1
        else:
            incoming.parent = 0
        if session.keep_alive > 0:
            session.keep_alive = session.keep_alive * self._keepalive_factor
        handler = _MeshHandler(self.plugins_manager, self._loop, max_packet=self._max_packet)
        self._live[session.client_id] = _Live(handler)
        return handler, session

    async def _take_over(self, client_id: str) -> None:
        """Disconnect the current connection of `client_id` without publishing its will; wait until it is gone."""
        live = self._live[client_id]
        log.info("client %s connected again: closing its previous connection (no will)", client_id)
        live.handler.taken_over = True
        await live.handler.handle_connection_closed()
        try:
            await asyncio.wait_for(live.ended.wait(), _TAKEOVER_WAIT_S)
        except TimeoutError:
            log.warning("previous connection of %s did not end within %.0fs", client_id, _TAKEOVER_WAIT_S)

    async def _authenticate(self, session: Session, _: ListenerConfig) -> bool:
        # Every connection reaching this point was admitted in _initialize_client_session.
        return True

    async def _handle_client_session(self, reader, writer, client_session, handler, server, listener_name) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)
        finally:
            for client_id, live in list(self._live.items()):
                if live.handler is handler:
                    del self._live[client_id]
                    live.ended.set()

    async def _handle_disconnect(self, client_session: Session, handler, disconnect_waiter) -> None:
        if isinstance(handler, _MeshHandler) and handler.taken_over:
            # A takeover is not an abnormal disconnect of the node: its new connection is alive. Do what amqtt's
            # _handle_disconnect does minus the will (with clean_session=0 the session's will is the *new* one).
            await self._stop_handler(handler)
            client_session.transitions.disconnect()
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    # --- authorization ----------------------------------------------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if self.open_access:
            return True
        username = session.username if session is not None else None
        if action == Action.PUBLISH:
            return access.may_publish(username, topic, mesh=self._mesh)
        if action == Action.SUBSCRIBE:
            return access.may_subscribe(username, topic, mesh=self._mesh)
        return access.may_receive(username, topic, mesh=self._mesh)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        # amqtt calls this after a SUBSCRIBE and, on every (re)connect, once for every filter held by *any*
        # session; and it checks nothing. Send only for the session's own filter and only what it may receive.
        topic_filter, _ = subscription
        own = [qos for s, qos in self._subscriptions.get(topic_filter, ()) if s.client_id == session.client_id]
        handler = self._get_handler(session)
        if not own or handler is None:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                log.debug("not sending retained %s to %s: not allowed", topic, session.client_id)
                continue
            qos = min(own[0], retained.qos if retained.qos is not None else own[0])
            sends.append(asyncio.ensure_future(handler.mqtt_publish(topic, retained.data, qos, retain=True)))
        if sends:
            await asyncio.wait(sends)


class EmbeddedBroker:
    """meshvpn's MQTT broker in-process: amqtt in its own thread and event loop."""

    def __init__(self, settings: BrokerServerSettings) -> None:
        self.settings = settings
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._port: int | None = None
        self.broker: MeshBroker | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the real one when settings.port is 0); only valid after start()."""
        if self._port is None:
            raise BrokerStartError("embedded broker is not running")
        return self._port

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.settings.certfile else "mqtt"
        return f"{scheme}://{self.settings.host}:{self.port}"

    def disconnect(self, username: str) -> None:
        """Drop `username`'s live session now (thread-safe; waits until the broker did it)."""
        if self._loop is None or self.broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self.broker.disconnect(username), self._loop)
        try:
            future.result(timeout=_TAKEOVER_WAIT_S)
        except TimeoutError:
            log.warning("could not drop the session of %s within %.0f s", username, _TAKEOVER_WAIT_S)

    def start(self) -> None:
        """Start listening; returns once connections are accepted. Raises BrokerStartError."""
        if self._thread is not None:
            raise BrokerStartError("embedded broker already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise BrokerStartError(f"embedded broker did not start within {_START_TIMEOUT_S}s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise BrokerStartError(
                f"embedded broker cannot listen on {self.settings.host}:{self.settings.port}: {self._error}"
            ) from self._error
        log.info("embedded broker listening on %s:%s", self.settings.host, self._port)

    def stop(self) -> None:
        """Close every connection and the listener; returns when the broker thread has ended."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop_requested is not None:
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join(timeout=15)
        self._thread = None
        self._port = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        s = self.settings
        listener: dict = {"type": "tcp", "bind": f"{s.host}:{s.port}"}
        if s.certfile is not None:
            listener.update(ssl=True, certfile=str(s.certfile), keyfile=str(s.keyfile))
        config = {
            "listeners": {"default": listener},
            # No amqtt plugins: MeshBroker authenticates and authorizes itself, and $SYS is not wanted.
            "plugins": {},
        }
        try:
            self.broker = MeshBroker(
                config,
                password_file=s.password_file,
                allow_anonymous=s.allow_anonymous,
                keepalive_factor=s.keepalive_factor,
                mesh=s.mesh,
                max_packet=s.max_packet_size,
                login_rate=RatePolicy(rate_per_s=s.failed_logins_per_s, burst=s.failed_logins_burst),
            )
            await self.broker.start()
        except (AmqttBrokerError, AMQTTError, OSError) as exc:
            self._error = exc
            self._ready.set()
            return
        server = self.broker._servers["default"].instance
        self._port = server.sockets[0].getsockname()[1]
        if self.broker.open_access:
            log.warning("embedded broker is open: anonymous access and no ACL (no password file configured)")
        self._ready.set()
        watcher = asyncio.ensure_future(self.broker.watch_accounts(_ACCOUNT_CHECK_S))
        await self._stop_requested.wait()
        watcher.cancel()
        await self.broker.close(_SHUTDOWN_TIMEOUT_S)
