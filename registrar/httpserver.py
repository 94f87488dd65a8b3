"""Serving the registrar's HTTP API: uvicorn in a thread, over TLS on the network or on a local unix socket.

Two listeners run the same application: the network one (TLS with the registrar's own certificate, which
agents verify against the mesh CA pinned by their join token) and the admin socket in the state directory,
whose file permissions (0600, the registrar's user) are what authenticates the CLI. BodyLimit caps request bodies
before they are read (registrar.api installs it), so a 64 MiB upload costs nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import uvicorn

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # the largest request the API accepts (an EnrollRequest is well under 4 KiB)


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over `limit`, and a stream cut off once it passes it."""

    def __init__(self, app, *, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    await _too_large(send, self.limit)
                    return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(send, self.limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    body = b'{"detail":"request body larger than %d bytes"}' % limit
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HttpServer:
    """uvicorn serving `app` in a background thread: TCP (TLS when given a certificate) or a unix socket."""

    def __init__(
        self,
        app,
        *,
        host: str | None = None,
        port: int | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        uds: Path | None = None,
    ) -> None:
        self._uds = uds
        # proxy_headers off: uvicorn would otherwise take X-Forwarded-For from a peer on 127.0.0.1 as the client
        # address, and the rate limits and GET /v1/reflect must see the real TCP peer (no proxy sits in front).
        options: dict = {"log_level": "warning", "access_log": False, "proxy_headers": False}
        if uds is not None:
            options["uds"] = str(uds)
        else:
            options.update(host=host, port=port)
            if certfile is not None:
                options.update(ssl_certfile=str(certfile), ssl_keyfile=str(keyfile))
        self._server = uvicorn.Server(uvicorn.Config(app, **options))
        # Signals belong to the CLI's main thread, not to uvicorn in a worker thread.
        self._server.install_signal_handlers = lambda: None
        self._thread = threading.Thread(target=self._server.run, name="registrar-http", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        if self._uds is not None:
            # The socket lives in the state directory (0700): nobody else can reach it even before the chmod.
            self._uds.unlink(missing_ok=True)  # a stale socket of a previous run
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("HTTP API did not start")
            time.sleep(0.02)
        if self._uds is not None:
            os.chmod(self._uds, 0o600)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        if self._uds is not None:
            self._uds.unlink(missing_ok=True)
