"""How `meshvpn-registrar tokens|nodes|credentials ...` reach the running registrar: its local admin socket.

The socket is STATE_DIR/admin.sock, 0600 in the 0700 state directory: whoever can open it is the registrar's
user (or root), and that is the authentication. A command never writes the database behind a running
registrar's back, and a command aimed at a state directory no registrar runs on says so instead of silently
writing somewhere nobody reads.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from registrar.errors import RegistrarError

_TIMEOUT_S = 15.0


class AdminUnavailable(RegistrarError):
    """No registrar answers on the admin socket."""


class AdminRequestFailed(RegistrarError):
    """The registrar refused or failed an admin request; `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("registrar", timeout=_TIMEOUT_S)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Requests to the registrar whose state directory holds `socket_path`."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """The JSON answer (None for 204); AdminUnavailable or AdminRequestFailed saying what to do."""
        conn = _UnixConnection(self.socket_path)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
            response = conn.getresponse()
            data = response.read()
        except FileNotFoundError:
            raise AdminUnavailable(
                f"no registrar is running with state directory {self.socket_path.parent} (no {self.socket_path.name}"
                " there): start it, or point this command at the running one with --config or --state-dir"
            ) from None
        except PermissionError:
            raise AdminUnavailable(
                f"permission denied on {self.socket_path}: run as the registrar's user (sudo -u meshvpn-registrar ...) or root"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise AdminUnavailable(f"the registrar at {self.socket_path} does not answer: {exc}") from exc
        finally:
            conn.close()
        if response.status >= 400:
            try:
                detail = json.loads(data).get("detail", data.decode(errors="replace"))
            except (ValueError, AttributeError):
                detail = data.decode(errors="replace")
            raise AdminRequestFailed(response.status, f"{method} {path}: {detail}")
        return json.loads(data) if data else None
