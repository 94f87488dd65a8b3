"""The agent's local API: a unix socket speaking meshcontract.localapi (one JSON request, one JSON reply).

Served from its own threads (one per connection), so a slow `ping` never blocks the MQTT session or the
reconcile loop. The socket is root-only (0600) by default: status and ping reveal the mesh's topology. To let
a desktop chat running as a user read it, set `socket_mode = 0o660` and `socket_group` (see docs/agent.md).
The handler learns each caller's uid from the kernel (SO_PEERCRED), so that an op that changes the node can be
kept from a group that may only read (meshcontract.localapi.refusal).
"""

from __future__ import annotations

import grp
import json
import logging
import os
import selectors
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from meshcontract.localapi import MAX_LOCAL_MESSAGE, LocalRequest, LocalResponse
from nodeagent.errors import AgentError

log = logging.getLogger(__name__)

_READ_TIMEOUT_S = 5.0
_ACCEPT_TIMEOUT_S = 1.0  # bounds one accept should a connection vanish between readiness and accept
_STOP_TIMEOUT_S = 5.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Handler(Protocol):
    """Answers one request; `caller_uid` is the connecting process's uid (None if the kernel did not say)."""

    def __call__(self, request: LocalRequest, *, caller_uid: int | None) -> LocalResponse: ...


def peer_uid(connection: socket.socket) -> int | None:
    """The uid of the process at the other end of a unix socket, as the kernel recorded it at connect time."""
    try:
        _, uid, _ = _UCRED.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (OSError, AttributeError):  # AttributeError: a platform without SO_PEERCRED
        return None
    return uid


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handle_request_fn: Handler


class _RequestHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.connection.settimeout(_READ_TIMEOUT_S)
        try:
            line = self.rfile.readline(MAX_LOCAL_MESSAGE + 1)
        except OSError:
            return
        response = self._answer(line)
        try:
            self.wfile.write(response.model_dump_json().encode() + b"\n")
        except OSError:
            pass  # the client went away; nothing to tell it

    def _answer(self, line: bytes) -> LocalResponse:
        if len(line) > MAX_LOCAL_MESSAGE:
            return LocalResponse(ok=False, error="request too large")
        try:
            request = LocalRequest.model_validate(json.loads(line))
        except (ValueError, ValidationError) as exc:
            return LocalResponse(ok=False, error=f"bad request: {exc}")
        server: _Server = self.server  # type: ignore[assignment]
        try:
            return server.handle_request_fn(request, caller_uid=peer_uid(self.connection))
        except AgentError as exc:
            return LocalResponse(ok=False, error=str(exc))


class LocalApiServer:
    """Serves `handler` on the unix socket at `path` until `stop()`."""

    def __init__(self, path: Path, handler: Handler, *, mode: int = 0o600, group: str | None = None) -> None:
        self.path = Path(path)
        self._handler = handler
        self._mode = mode
        self._group = group
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake: socket.socket | None = None  # stop() writes a byte here to end the serving thread

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve from a background thread."""
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise AgentError(f"cannot create {self.path.parent} for the local API socket: {exc}") from exc
        self._remove_stale()
        # Bind under a temporary name, set mode and group, then rename into place: the socket is never
        # reachable at its public path with the umask's (possibly looser) permissions.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            server = _Server(str(tmp), _RequestHandler, bind_and_activate=True)
            try:
                os.chmod(tmp, self._mode)
                if self._group is not None:
                    os.chown(tmp, -1, grp.getgrnam(self._group).gr_gid)
                os.replace(tmp, self.path)
            except (OSError, KeyError):
                server.server_close()
                tmp.unlink(missing_ok=True)
                raise
        except (OSError, KeyError) as exc:
            raise AgentError(f"cannot serve the local API on {self.path}: {exc}") from exc
        server.handle_request_fn = self._handler
        server.timeout = _ACCEPT_TIMEOUT_S
        self._server = server
        self._wake, woken = socket.socketpair()
        self._thread = threading.Thread(
            target=_serve, args=(server, woken), name="agent-localapi", daemon=True
        )
        self._thread.start()
        log.info("local API listening on %s (mode %o)", self.path, self._mode)

    def stop(self) -> None:
        """Stop serving and remove the socket file."""
        if self._server is None:
            return
        assert self._wake is not None and self._thread is not None
        self._wake.send(b"x")
        self._thread.join(_STOP_TIMEOUT_S)
        self._wake.close()
        self._server.server_close()
        self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _remove_stale(self) -> None:
        if not self.path.exists():
            return
        # A socket someone still answers on belongs to a running agent: refuse rather than steal it.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()
                return
        raise AgentError(f"another agent is already serving {self.path}")


def _serve(server: _Server, woken: socket.socket) -> None:
    """Accept connections until a byte arrives on `woken`.

    Not socketserver's serve_forever: it wakes every poll interval to notice a shutdown, which kept an idle
    agent busy 5 times a second (docs/benchmarks.md, "agent footprint"); this thread sleeps until a client
    connects or stop() writes to the other end of `woken`.
    """
    with woken, selectors.DefaultSelector() as selector:
        selector.register(server, selectors.EVENT_READ)
        selector.register(woken, selectors.EVENT_READ)
        while True:
            ready = [key.fileobj for key, _ in selector.select()]
            if woken in ready:
                return
            server.handle_request()  # one accept; the connection is served from a thread of its own
