"""UserspaceWireGuard's socket conversation, against a small UAPI server on a unix socket in tmp_path.

The real wireguard-go is exercised by tests/system/test_wgctl_userspace.py; this covers the protocol edges
that are hard to provoke there (truncated answers, silence, stale sockets, errno).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgctl import keys
from wgctl.errors import InterfaceNotFoundError, InvalidConfigError, UapiError
from wgctl.model import PeerChanges, PeerConfig
from wgctl.uapi import encode_set
from wgctl.userspace import UserspaceWireGuard, check_ifname

PEER = keys.public_key(keys.generate_private_key())


class UapiServer:
    """Accepts connections on `path`; answers each request with `answer` (None: stay silent)."""

    def __init__(self, path: Path, answer: bytes | None) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                if self.answer is None:
                    conn.recv(1)  # until the client gives up and closes
                else:
                    conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve(tmp_path) -> Iterator:
    servers: list[UapiServer] = []

    def start(answer: bytes | None) -> UapiServer:
        server = UapiServer(tmp_path / "wgu0.sock", answer)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def backend(tmp_path) -> UserspaceWireGuard:
    return UserspaceWireGuard(socket_dir=tmp_path, io_timeout=0.5)


def test_read_sends_get_and_parses(serve, backend):
    hex_key = keys.decode_key(PEER).hex()
    server = serve(f"listen_port=5\npublic_key={hex_key}\nallowed_ip=100.96.0.2/32\nerrno=0\n\n".encode())
    state = backend.read("wgu0")
    assert server.requests == [b"get=1\n\n"]
    assert state.listen_port == 5 and state.peers[PEER].allowed_ips == ("100.96.0.2/32",)


def test_empty_apply_sends_nothing(serve, backend):
    server = serve(b"errno=0\n\n")
    backend.apply("wgu0", PeerChanges())
    assert server.requests == []


def test_apply_is_one_request(serve, backend):
    server = serve(b"errno=0\n\n")
    changes = PeerChanges(
        upsert=(PeerConfig(PEER, ("100.96.0.2/32",)),), remove=(keys.public_key(keys.generate_private_key()),)
    )
    backend.apply("wgu0", changes)
    assert server.requests == [encode_set(changes=changes).encode()]


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        pytest.param(b"errno=22\n\n", UapiError, "errno=22", id="errno"),
        pytest.param(b"listen_port=5\n", UapiError, "closed the connection", id="truncated"),
        pytest.param(None, UapiError, "did not answer", id="silent"),
    ],
)
def test_failed_conversations(serve, backend, answer, error, message):
    serve(answer)
    with pytest.raises(error, match=message):
        backend.apply("wgu0", PeerChanges(remove=(PEER,)))


def test_missing_socket_is_interface_not_found(backend):
    with pytest.raises(InterfaceNotFoundError):
        backend.read("wgu0")


def test_stale_socket_is_interface_not_found(tmp_path, backend):
    # A socket file left behind by a daemon that died: connecting is refused.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "wgu0.sock"))
    stale.close()
    with pytest.raises(InterfaceNotFoundError):
        backend.read("wgu0")


@pytest.mark.parametrize("name", ["", "a" * 16, "../etc", "wg 0", "wg/0", "."])
def test_invalid_interface_names(backend, name):
    with pytest.raises(InvalidConfigError):
        check_ifname(name)
    with pytest.raises(InvalidConfigError):
        backend.read(name)
