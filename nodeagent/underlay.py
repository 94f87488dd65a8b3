"""This node's view of its underlay: the addresses on its interfaces, the address the registrar sees it come from,
and the endpoint candidates it advertises from them (the rules are nodeagent.candidates').

Two small interfaces with an in-memory implementation each, for tests: `AddressSource` (the kernel's addresses
through rtnetlink, or a list) and `Reflector` (GET /v1/reflect on the registrar over its pinned TLS, or a fixed
answer). `Advertiser` keeps the current candidate list; the session asks it before every registration and the
agent's timer calls `refresh()` to notice a changed address.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from meshcontract.messages import Endpoint
from nodeagent import candidates
from nodeagent.candidates import InterfaceAddress
from nodeagent.enrollment import TransientError, reflect
from nodeagent.errors import SettingsError
from wgctl.errors import NetlinkError
from wgctl.routes import interface_addresses

log = logging.getLogger(__name__)

# A registration waits for the reflection: keep it short. No answer in time: no reflexive candidate this time.
REFLECT_TIMEOUT_S = 3.0


def default_route_ipv4() -> str | None:
    """The source address the kernel would use towards the internet (the default route's), None without one.

    Connecting a UDP socket sends nothing; it only asks the routing table for a source address.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: never answered, only routed
        except OSError:
            return None
        return sock.getsockname()[0]


class AddressSource(Protocol):
    """The addresses of this machine's interfaces. OSError (or a wgctl NetlinkError) if they cannot be read."""

    def addresses(self) -> list[InterfaceAddress]: ...

    def primary(self) -> str | None:
        """The default route's source address, if any (advertised first)."""
        ...


class InMemoryAddresses:
    """An AddressSource holding a list that tests change (`set`) to simulate a new network."""

    def __init__(self, addresses: Sequence[InterfaceAddress] = (), *, primary: str | None = None) -> None:
        self._lock = threading.Lock()
        self._addresses = list(addresses)
        self._primary = primary

    def set(self, addresses: Sequence[InterfaceAddress], *, primary: str | None = None) -> None:
        with self._lock:
            self._addresses, self._primary = list(addresses), primary

    def addresses(self) -> list[InterfaceAddress]:
        with self._lock:
            return list(self._addresses)

    def primary(self) -> str | None:
        with self._lock:
            return self._primary


class NetlinkAddresses:
    """The kernel's interface addresses (rtnetlink, in the current network namespace)."""

    def addresses(self) -> list[InterfaceAddress]:
        try:
            return [InterfaceAddress(ifname, address, up) for ifname, address, up in interface_addresses()]
        except NetlinkError as exc:
            raise OSError(f"cannot list interface addresses: {exc}") from exc

    def primary(self) -> str | None:
        return default_route_ipv4()


class Reflector(Protocol):
    """Asks the control plane which address it sees us come from. None if it cannot say now."""

    def reflect(self) -> str | None: ...


class StaticReflector:
    """A Reflector with a fixed answer that tests change: a node behind a NAT (`address`), or none."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def reflect(self) -> str | None:
        return self.address


class RegistrarReflector:
    """GET /v1/reflect on the registrar over TLS verified against the mesh CA in the state directory."""

    def __init__(self, registrar_url: str, *, ca_file: Path, timeout_s: float = REFLECT_TIMEOUT_S) -> None:
        self._url = registrar_url
        self._ca_file = ca_file
        self._timeout_s = timeout_s
        self._failing: bool | None = None

    def reflect(self) -> str | None:
        try:
            ca_pem = self._ca_file.read_text() if self._ca_file.exists() else None
            address = reflect(self._url, ca_pem=ca_pem, timeout=self._timeout_s)
        except (TransientError, SettingsError, OSError) as exc:
            # Worth a line when it starts failing, not every minute after.
            level = logging.INFO if self._failing is not True else logging.DEBUG
            log.log(level, "no reflexive endpoint candidate for now: %s", exc, extra={"event": "reflect_failed"})
            self._failing = True
            return None
        if self._failing:
            log.info("the registrar reflects our address again", extra={"event": "reflect_ok"})
        self._failing = False
        return address


class EndpointSource(Protocol):
    """The endpoint candidates the session's registrations advertise."""

    def before_registration(self) -> list[Endpoint]:
        """Refreshed now (may ask the registrar, with a short timeout): at the start of each registration."""
        ...

    def prepare(self) -> Callable[[], list[Endpoint]]:
        """Start `before_registration()` now, in the background; the returned call waits for its result (or
        raises its error). The session starts it as it connects to the broker and calls it to register."""
        ...

    def current(self) -> list[Endpoint]:
        """As last refreshed (no I/O)."""
        ...


class FixedEndpoints:
    """An EndpointSource that never changes (a session built without an Advertiser)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = list(endpoints)

    def before_registration(self) -> list[Endpoint]:
        return list(self._endpoints)

    def prepare(self) -> Callable[[], list[Endpoint]]:
        return self.before_registration

    def current(self) -> list[Endpoint]:
        return list(self._endpoints)


class Advertiser:
    """The EndpointSource of a running agent: the candidates this node advertises, kept current. Thread-safe (the
    session's thread asks before registering, the agent's timer refreshes)."""

    def __init__(
        self,
        *,
        public: Endpoint | None,
        listen_port: int,
        interface: str,
        addresses: AddressSource,
        reflector: Reflector | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._public = public
        self._port = listen_port
        self._interface = interface
        self._addresses = addresses
        self._reflector = reflector
        self._clock = clock
        self._lock = threading.Lock()
        self._local: list[str] = []
        self.moves = 0  # how often the local addresses changed after the first read (roams), for the agent
        self._reflected: str | None = None
        self._reflected_at: float | None = None
        self._reflect_failed = False
        self._current: list[Endpoint] = candidates.advertised(
            public=public, local=[], reflected=None, port=listen_port
        )

    def current(self) -> list[Endpoint]:
        """The candidates as last refreshed (no I/O)."""
        with self._lock:
            return list(self._current)

    @property
    def reflected(self) -> str | None:
        """The address the registrar last saw us come from (even when not advertised), None if unknown."""
        with self._lock:
            return self._reflected

    def before_registration(self) -> list[Endpoint]:
        """Refresh, asking the registrar for the reflection whatever its age, and return the candidates."""
        self.refresh(reflect=True)
        return self.current()

    def prepare(self) -> Callable[[], list[Endpoint]]:
        """`before_registration()` on a thread of its own, started now; the call returned waits for it.

        The reflection is an HTTPS request to the registrar and the broker connection a TLS handshake too: made
        side by side, the registration request leaves right after the SUBACK (in the lab 10-80 ms sooner; the
        reply then comes only a few ms sooner, as the embedded broker's process also serves the reflection).
        """
        outcome: list[list[Endpoint] | Exception] = []

        def run() -> None:
            try:
                outcome.append(self.before_registration())
            except Exception as exc:  # handed to the caller of result(), which handles it as it would have
                outcome.append(exc)

        thread = threading.Thread(target=run, name="agent-endpoints-before-registration", daemon=True)
        thread.start()

        def result() -> list[Endpoint]:
            thread.join()
            answer = outcome[0]
            if isinstance(answer, Exception):
                raise answer
            return answer

        return result

    def refresh(self, *, reflect: bool | None = None) -> bool:
        """Read the local addresses and ask for the reflection (`reflect`: None when due, True now, False not);
        True if the candidates changed."""
        with self._lock:
            local = self._read_local()
            local_changed = local != self._local
            if local_changed and self._local:
                self.moves += 1
            self._local = local
            now = self._clock()
            due = candidates.reflect_due(
                last_at=self._reflected_at, now=now, local_changed=local_changed, failed=self._reflect_failed
            )
            if self._reflector is not None and (reflect or (reflect is None and due)):
                answer = self._reflector.reflect()
                # No answer before a registration or on a new network: no reflexive candidate this time. A
                # periodic check that fails on the same network keeps the last one (no flapping while the
                # registrar restarts) and is tried again at the next check.
                if answer is not None or reflect or local_changed:
                    self._reflected = answer
                self._reflected_at, self._reflect_failed = now, answer is None
            new = candidates.advertised(public=self._public, local=local, reflected=self._reflected, port=self._port)
            changed = new != self._current
            if changed:
                log.info(
                    "endpoint candidates: %s", ", ".join(f"{e} ({e.kind})" for e in new) or "none",
                    extra={"event": "endpoints_changed"},
                )  # fmt: skip
            self._current = new
            return changed

    def _read_local(self) -> list[str]:
        try:
            found = self._addresses.addresses()
            primary = self._addresses.primary()
        except OSError as exc:
            log.debug("cannot read interface addresses, keeping the last ones: %s", exc)
            return self._local
        return candidates.local_addresses(found, exclude={self._interface}, primary=primary)
