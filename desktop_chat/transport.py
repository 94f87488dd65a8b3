"""Chat over TCP between mesh IPs: a blocking client that waits for the ack, and a threaded server.

Nothing here knows about the agent, the history or Qt. The server asks a callable whether the source
address is a mesh member; that check means something because WireGuard's cryptokey routing only lets a
packet in from a peer whose AllowedIPs contain its source address, so on the mesh interface the source IP
is authenticated by the tunnel.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable

from desktop_chat.errors import ChatError, DeliveryError, FrameError, ListenError
from desktop_chat.framing import (
    HEADER,
    Ack,
    ChatMessage,
    Refusal,
    body_length,
    decode_body,
    encode_ack,
    encode_message,
    encode_refusal,
)

__all__ = ["ChatServer", "ListenError", "send_message"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes; fewer only if the other side closed (the caller checks)."""
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_frame(sock: socket.socket):
    """Read one frame; None on a clean close before any byte. FrameError on a bad or cut-off frame."""
    header = _recv_exact(sock, HEADER.size)
    if not header:
        return None
    length = body_length(header)
    body = _recv_exact(sock, length)
    if len(body) < length:
        raise FrameError("truncated", f"connection closed after {len(body)} of {length} body bytes")
    return decode_body(body)


def _connect_reason(exc: OSError, host: str, port: int, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"connect to {host}:{port} timed out after {timeout:g}s (peer unreachable?)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {host}:{port} (no chat listening there)"
    if exc.errno == errno.EHOSTUNREACH:
        return f"no route to host {host} (no tunnel to it)"
    if exc.errno == errno.ENETUNREACH:
        return f"network unreachable for {host} (mesh interface down?)"
    return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def send_message(
    host: str,
    port: int,
    message: ChatMessage,
    *,
    timeout: float = 5.0,
    source_ip: str | None = None,
) -> None:
    """Deliver `message` to `host:port` and wait for its ack; DeliveryError with the reason otherwise.

    `timeout` bounds the whole exchange (connect, send, ack). `source_ip` binds our end to that address,
    so the receiver sees our mesh IP as the source (and tests on loopback can use 127.0.0.x addresses).
    """
    deadline = time.monotonic() + timeout
    frame = encode_message(message)
    try:
        family = _family(host)
    except ValueError as exc:
        raise DeliveryError(f"{host!r} is not an IP address (names are display only)") from exc
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if source_ip:
            try:
                sock.bind((source_ip, 0))
            except OSError as exc:
                raise DeliveryError(f"cannot use source address {source_ip}: {exc.strerror or exc}") from exc
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError as exc:
            raise DeliveryError(_connect_reason(exc, host, port, timeout)) from exc
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(frame)
            reply = _read_frame(sock)
        except TimeoutError as exc:
            raise DeliveryError(f"no ack from {host} within {timeout:g}s") from exc
        except FrameError as exc:
            raise DeliveryError(f"bad reply from {host}: {exc}") from exc
        except OSError as exc:
            raise DeliveryError(f"connection to {host} lost: {exc.strerror or exc}") from exc
    if reply is None:
        raise DeliveryError(f"{host} closed the connection without an ack")
    if isinstance(reply, Refusal):
        raise DeliveryError(f"refused by {host}: {reply.reason}")
    if not isinstance(reply, Ack) or reply.id != message.id:
        raise DeliveryError(f"unexpected reply from {host}: {reply!r}")


class ChatServer:
    """Accepts chat connections on one address, refuses non-members, acks each message it delivered.

    `is_member(ip)` decides whether a source address may talk to us. `on_message(from_ip, message)` is
    called in a connection thread; the ack is sent only after it returns, so a message is acknowledged
    only once it is stored. If it raises ChatError no ack is sent and the sender sees the failure.
    Messages are delivered at least once: a sender that retries after a lost ack sends the same id again,
    and on_message is expected to treat a known id as already stored.
    """

    def __init__(
        self,
        *,
        bind: str,
        port: int,
        is_member: Callable[[str], bool],
        on_message: Callable[[str, ChatMessage], None],
        read_timeout: float = 10.0,
    ) -> None:
        self._bind = bind
        self._port = port
        self._is_member = is_member
        self._on_message = on_message
        self._read_timeout = read_timeout
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = threading.Event()
        self._connections: set[threading.Thread] = set()
        self._connections_lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        if self._sock is None:
            return self._bind, self._port
        host, port = self._sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        """Bind and start accepting; returns once listening. ListenError if the address cannot be bound."""
        try:
            sock = socket.socket(_family(self._bind), socket.SOCK_STREAM)
        except ValueError as exc:
            raise ListenError(f"bind address {self._bind!r} is not an IP address") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._bind, self._port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise ListenError(f"cannot listen on {self._bind}:{self._port}: {exc.strerror or exc}") from exc
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name=f"chat-accept-{self._bind}", daemon=True)
        self._thread.start()
        log.info("chat listening on %s:%s", *self.address)

    def stop(self, *, grace: float = 2.0) -> None:
        """Stop accepting, close the listening socket and give connections in progress up to `grace` seconds.

        The grace matters when the process exits right after a message arrived (`listen --count`): the
        message is delivered to on_message before its ack is written, and the sender must still get the ack.
        """
        self._stopping.set()
        if self._sock is not None:
            try:
                # shutdown wakes the thread blocked in accept(); close alone does not on Linux.
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sock = None
        self._thread = None
        deadline = time.monotonic() + grace
        with self._connections_lock:
            connections = list(self._connections)
        for conn_thread in connections:
            conn_thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> ChatServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, addr = sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.warning("chat accept failed on %s:%s, retrying", *self.address, exc_info=True)
                time.sleep(0.1)  # avoid a hot loop on EMFILE; nothing to wait on here
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("chat connection from %s dropped: %s connections already open", addr[0],
                            MAX_CONNECTIONS)
                conn.close()
                continue
            conn_thread = threading.Thread(target=self._serve, args=(conn, addr[0]), name=f"chat-conn-{addr[0]}",
                                           daemon=True)
            with self._connections_lock:
                self._connections.add(conn_thread)
            conn_thread.start()

    def _serve(self, conn: socket.socket, peer_ip: str) -> None:
        try:
            with conn:
                conn.settimeout(self._read_timeout)
                if not self._is_member(peer_ip):
                    log.warning("chat connection refused: %s is not a current mesh member", peer_ip,
                                extra={"mesh_ip": peer_ip})
                    conn.sendall(encode_refusal(f"{peer_ip} is not a current mesh member"))
                    return
                self._serve_member(conn, peer_ip)
        except OSError as exc:
            log.info("chat connection from %s ended: %s", peer_ip, exc)
        finally:
            self._slots.release()
            with self._connections_lock:
                self._connections.discard(threading.current_thread())

    def _serve_member(self, conn: socket.socket, peer_ip: str) -> None:
        while True:
            try:
                frame = _read_frame(conn)
            except FrameError as exc:
                log.warning("chat connection from %s closed: bad frame (%s)", peer_ip, exc,
                            extra={"mesh_ip": peer_ip})
                return
            if frame is None:
                return
            if not isinstance(frame, ChatMessage):
                log.warning("chat connection from %s closed: unexpected %s frame", peer_ip,
                            type(frame).__name__, extra={"mesh_ip": peer_ip})
                return
            try:
                self._on_message(peer_ip, frame)
            except ChatError as exc:
                log.error("chat message %s from %s not stored, no ack: %s", frame.id, peer_ip, exc,
                          extra={"mesh_ip": peer_ip})
                return
            conn.sendall(encode_ack(frame.id))
