"""A stand-in node agent: serves an AgentStatus you set over the real local API (unix socket).

For tests and loopback demos of the chat without a mesh: it speaks meshcontract.localapi exactly as the
agent does (one JSON request line in, one JSON response line out), so the chat's AgentPeerSource is
exercised for real. `ping` is answered with an error; `set_status(None)` makes it answer `ok: false`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path

from meshcontract.localapi import AgentStatus, LocalRequest, LocalResponse

log = logging.getLogger(__name__)


class StubAgent:
    """A unix-socket server answering `status` with the AgentStatus most recently set."""

    def __init__(self, socket_path: str | Path, status: AgentStatus | None = None) -> None:
        self.socket_path = str(socket_path)
        self._status = status
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.requests = 0

    def set_status(self, status: AgentStatus | None) -> None:
        """Answer later requests with `status` (None: an `ok: false` reply)."""
        with self._lock:
            self._status = status

    @property
    def status(self) -> AgentStatus | None:
        with self._lock:
            return self._status

    def start(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.socket_path)
        sock.listen(8)
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="stub-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def __enter__(self) -> StubAgent:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._answer(conn)
                except OSError as exc:
                    log.debug("stub agent client went away: %s", exc)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        while not data.endswith(b"\n") and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        self.requests += 1
        try:
            request = LocalRequest.model_validate(json.loads(data))
        except ValueError as exc:
            response = LocalResponse(ok=False, error=f"bad request: {exc}")
        else:
            status = self.status
            if request.op != "status":
                response = LocalResponse(ok=False, error=f"the stub agent does not do {request.op}")
            elif status is None:
                response = LocalResponse(ok=False, error="no status")
            else:
                response = LocalResponse(ok=True, status=status)
        conn.sendall(response.model_dump_json().encode() + b"\n")
