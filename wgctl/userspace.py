"""WireGuard through wireguard-go and its UAPI unix socket.

wireguard-go is started detached (its own session, daemonised by wireguard-go itself) and found again by its
socket, /var/run/wireguard/<ifname>.sock. So the interface, and every tunnel on it, outlives the process
that created it: an agent that restarts finds its interface as it left it and, when nothing changed, touches
nothing. Deleting the socket file makes wireguard-go shut down and remove its TUN device.

The socket directory is shared by all network namespaces, so interface names must be unique on the machine;
`ensure_interface` refuses a name whose daemon serves an interface in another namespace.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from wgctl import keys, routes, uapi
from wgctl.errors import (
    BackendUnavailableError,
    InterfaceNotFoundError,
    InvalidConfigError,
    UapiError,
    WireGuardError,
)
from wgctl.model import InterfaceState, PeerChanges

log = logging.getLogger(__name__)

DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
# wireguard-go refuses to run when the kernel could do WireGuard itself, unless told this.
PREFER_USERSPACE_ENV = "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"
# Variables wireguard-go reads to run as its own daemonised child; inherited from a caller they would make it
# run in the foreground (blocking ensure_interface) or use file descriptors that are not a TUN and a socket.
_CHILD_ENV = ("WG_PROCESS_FOREGROUND", "WG_TUN_FD", "WG_UAPI_FD", "LOG_LEVEL")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def check_ifname(name: str) -> str:
    """`name` if it is a valid Linux interface name (1-15 safe characters), else InvalidConfigError."""
    if not _IFNAME.match(name) or name in (".", ".."):
        raise InvalidConfigError(f"invalid interface name {name!r} (1-15 of A-Z a-z 0-9 _ . -)")
    return name


class UserspaceWireGuard:
    """WireGuardBackend driving wireguard-go over its UAPI socket (one request per connection)."""

    name = "userspace"

    def __init__(
        self,
        *,
        socket_dir: str | os.PathLike[str] = DEFAULT_SOCKET_DIR,
        binary: str = "wireguard-go",
        start_timeout: float = 10.0,
        io_timeout: float = 5.0,
    ) -> None:
        self.socket_dir = Path(socket_dir)
        self.binary = binary
        self.start_timeout = start_timeout
        self.io_timeout = io_timeout
        self._lock = threading.Lock()

    def socket_path(self, name: str) -> Path:
        """Where wireguard-go listens for interface `name`."""
        return self.socket_dir / f"{check_ifname(name)}.sock"

    # -- WireGuardBackend -------------------------------------------------------------------------------
    def ensure_interface(self, name: str, *, private_key: str, listen_port: int) -> bool:
        """Start wireguard-go for `name` unless it runs; set key and port if they differ. True if changed.

        A `listen_port` of 0 means "any port": an interface already listening somewhere is left as it is.
        """
        # Validate first: a bad key must not leave a freshly started, unconfigured daemon behind.
        keys.decode_key(private_key)
        with self._lock:
            created = False
            device = self._device_or_none(name)
            if device is None:
                self._start(name)
                device = self._wait_for_socket(name)
                created = True
            if not routes.link_exists(name):
                raise WireGuardError(
                    f"{self.socket_path(name)} serves an interface {name} in another network namespace; "
                    "interface names must be unique on the machine"
                )
            new_key = private_key if device.private_key != private_key else None
            new_port = listen_port if listen_port and device.listen_port != listen_port else None
            if new_key is None and new_port is None:
                return created
            uapi.check_set_response(
                self._request(name, uapi.encode_set(private_key=new_key, listen_port=new_port))
            )
            log.info(
                "configured %s: %s",
                name,
                ", ".join(p for p, v in (("private key", new_key), (f"port {listen_port}", new_port)) if v),
            )
            return True

    def read(self, name: str) -> InterfaceState:
        """The interface's state; InterfaceNotFoundError if no wireguard-go serves `name`."""
        return uapi.parse_get(self._request(name, uapi.GET_REQUEST)).state(name)

    def apply(self, name: str, changes: PeerChanges) -> None:
        """Send all `changes` in one UAPI set request; an empty change sends nothing.

        Everything is validated before the request is written. wireguard-go applies a request line by line,
        so an errno from the daemon itself (rare once validated: e.g. out of memory) can leave part applied;
        the next plan/apply corrects it.
        """
        if changes.is_empty():
            return
        request = uapi.encode_set(changes=changes)
        uapi.check_set_response(self._request(name, request))

    def delete_interface(self, name: str) -> None:
        """Stop wireguard-go for `name` (by removing its socket) and delete the link. No error if absent."""
        with self._lock:
            try:
                self.socket_path(name).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise WireGuardError(f"cannot remove {self.socket_path(name)}: {exc}") from exc
            # wireguard-go notices the socket is gone and exits, taking its TUN with it; deleting the link
            # as well makes the interface disappear now rather than a moment later.
            if routes.delete_link(name):
                log.info("deleted interface %s", name)

    # -- internals --------------------------------------------------------------------------------------
    def _request(self, name: str, text: str) -> str:
        path = self.socket_path(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.io_timeout)
        try:
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                # No socket, or a stale one left by a daemon that died: either way no interface.
                raise InterfaceNotFoundError(f"no wireguard-go serves {name} ({path}: {exc})") from exc
            sock.sendall(text.encode("ascii"))
            answer = bytearray()
            while not answer.endswith(b"\n\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise UapiError(f"{name}: wireguard-go closed the connection mid-answer")
                answer += chunk
            return answer.decode("ascii", errors="replace")
        except TimeoutError as exc:
            raise UapiError(f"{name}: wireguard-go did not answer within {self.io_timeout}s") from exc
        except OSError as exc:
            raise UapiError(f"{name}: UAPI conversation failed: {exc}") from exc
        finally:
            sock.close()

    def _device_or_none(self, name: str) -> uapi.UapiDevice | None:
        try:
            return uapi.parse_get(self._request(name, uapi.GET_REQUEST))
        except InterfaceNotFoundError:
            return None

    def _start(self, name: str) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise BackendUnavailableError(f"{self.binary} not found on PATH")
        env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV}
        env[PREFER_USERSPACE_ENV] = "1"
        self.socket_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        # Output goes to a file, not a pipe: the daemonised child inherits the parent's stdout when LOG_LEVEL
        # is set, and would keep a pipe open forever.
        with tempfile.TemporaryFile() as output:
            try:
                done = subprocess.run(
                    [binary, name],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    timeout=self.start_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise UapiError(
                    f"wireguard-go {name} did not daemonise within {self.start_timeout}s"
                ) from exc
            except OSError as exc:
                raise BackendUnavailableError(f"cannot run {binary}: {exc}") from exc
            if done.returncode != 0:
                output.seek(0)
                tail = output.read()[-800:].decode(errors="replace").strip()
                raise WireGuardError(f"wireguard-go {name} failed (exit {done.returncode}): {tail}")
        log.info("started wireguard-go for %s", name)

    def _wait_for_socket(self, name: str) -> uapi.UapiDevice:
        deadline = time.monotonic() + self.start_timeout
        while True:
            device = self._device_or_none(name)
            if device is not None:
                return device
            if time.monotonic() >= deadline:
                raise UapiError(f"wireguard-go {name} started but {self.socket_path(name)} never answered")
            time.sleep(0.02)
