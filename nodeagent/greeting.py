"""Greets peers just added to WireGuard with a few datagrams through the tunnel, to confirm their new session.

Why: when we remove a member (it went unreachable) and add it back, our WireGuard forgets every session with it,
while the member — a laptop that slept, a node that was cut off — still holds its old one. Our end starts a fresh
handshake at once (the persistent keepalive), and the member, as the responder, keeps sending with its old keys
until a data packet arrives on the new ones: WireGuard's keepalive right after the handshake is that packet. If
it is lost (a lossy link, the moment a network comes back), everything the member sends us is dropped until its
own timer starts another handshake, 15 s later (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT). A few datagrams of ours
through the tunnel, spread over the first seconds, are each another chance to confirm the session (found by the
chaos bench: docs/chaos.md, series 6).

The datagrams go to the discard port (9) of the peer's mesh IP, from a socket bound to our interface, so they can
only ever leave through the tunnel (with no such interface, as with an in-memory backend, nothing is sent). Their
content does not matter; the peer's kernel drops them (or answers "port unreachable", which is traffic our way).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

# When, after the peer was added, a datagram goes out: each is a chance of its own if the keepalive that should
# confirm the session was lost. One sent before the handshake is done waits for it in WireGuard's queue.
GREET_AFTER_S = (1.0, 3.0)
DISCARD_PORT = 9
PAYLOAD = b"meshvpn: session check"

Send = Callable[[str, Sequence[str]], None]


def send_datagrams(interface: str, ips: Sequence[str]) -> None:
    """One UDP datagram to each IP's discard port, from sockets bound to `interface`. OSError if none can be
    sent at all (no such interface, no permission); one unreachable address does not stop the others."""
    by_family: dict[int, list[str]] = {}
    for ip in ips:
        by_family.setdefault(socket.AF_INET6 if ":" in ip else socket.AF_INET, []).append(ip)
    for family, addresses in by_family.items():
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            for ip in addresses:
                try:
                    sock.sendto(PAYLOAD, (ip, DISCARD_PORT))
                except OSError as exc:
                    log.debug("session check to %s not sent: %s", ip, exc)


class Greeter:
    """Sends the datagrams of GREET_AFTER_S to the peers of each `greet` call, from a short-lived thread."""

    def __init__(self, interface: str, *, send: Send = send_datagrams,
                 after_s: Sequence[float] = GREET_AFTER_S) -> None:
        self._interface = interface
        self._send = send
        self._after_s = tuple(after_s)
        self._stopping = threading.Event()

    def greet(self, ips: Sequence[str]) -> threading.Thread | None:
        """Start greeting `ips` (mesh IPs of peers just added); the thread, or None if there is nothing to do."""
        if not ips or self._stopping.is_set():
            return None
        thread = threading.Thread(target=self._run, args=(tuple(ips),), name="greet", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop every greeting in progress at its next datagram."""
        self._stopping.set()

    def _run(self, ips: tuple[str, ...]) -> None:
        waited = 0.0
        for at in self._after_s:
            if self._stopping.wait(max(0.0, at - waited)):
                return
            waited = at
            try:
                self._send(self._interface, ips)
            except OSError as exc:  # no such interface (an in-memory backend) or no permission: nothing to confirm
                log.debug("no session check sent on %s: %s", self._interface, exc)
                return
