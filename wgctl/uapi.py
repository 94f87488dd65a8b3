"""The wireguard-go UAPI text protocol: encoding `set` requests and parsing `get` responses. No I/O here.

The protocol (https://www.wireguard.com/xplatform/) is line-based `key=value`; a request starts with
`set=1` or `get=1` and ends with an empty line; the answer ends with `errno=N` and an empty line. Keys are
lowercase hex on the wire where the rest of wgctl uses base64. A `public_key=` line starts a peer section;
every later peer key applies to that peer until the next `public_key=`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wgctl import keys
from wgctl.diff import validated_peer
from wgctl.errors import InvalidConfigError, InvalidKeyError, UapiError, UapiProtocolError
from wgctl.model import InterfaceState, PeerChanges, PeerState

GET_REQUEST = "get=1\n\n"
NO_CHANGES = PeerChanges()


def key_to_hex(key: str) -> str:
    """A base64 key as the 64 lowercase hex digits UAPI expects."""
    return keys.decode_key(key).hex()


def key_from_hex(text: str) -> str:
    """A UAPI hex key as base64; UapiProtocolError if it is not 32 bytes of hex."""
    try:
        raw = bytes.fromhex(text)
        return keys.encode_key(raw)
    except (ValueError, InvalidKeyError) as exc:
        raise UapiProtocolError(f"bad hex key in UAPI response: {text[:16]!r}") from exc


def encode_set(
    *,
    private_key: str | None = None,
    listen_port: int | None = None,
    changes: PeerChanges = NO_CHANGES,
    update_only: bool = False,
) -> str:
    """The text of one `set=1` request doing everything asked, validated before anything is written.

    Never sends `replace_peers` (peers not named are left alone). Removals come first, then upserts; each
    upsert sends `replace_allowed_ips=true` and the full allowed IP list, the keepalive (so 0 turns it off)
    and the endpoint only if one is given (WireGuard cannot unset an endpoint). `update_only` makes upserts
    skip peers that no longer exist instead of re-creating them.
    """
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={key_to_hex(private_key)}")
    if listen_port is not None:
        if not 0 <= listen_port < 65536:
            raise InvalidConfigError(f"listen port {listen_port} out of range")
        lines.append(f"listen_port={listen_port}")
    for key in changes.remove:
        lines += [f"public_key={key_to_hex(key)}", "remove=true"]
    for peer in map(validated_peer, changes.upsert):
        lines.append(f"public_key={key_to_hex(peer.public_key)}")
        if update_only:
            lines.append("update_only=true")
        if peer.endpoint is not None:
            lines.append(f"endpoint={peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={cidr}" for cidr in peer.allowed_ips]
    return "\n".join(lines) + "\n\n"


@dataclass(frozen=True, slots=True)
class UapiDevice:
    """A parsed `get=1` answer. Holds the private key, so it stays inside the backend; expose `state()`."""

    private_key: str | None
    listen_port: int | None
    fwmark: int = 0
    peers: dict[str, PeerState] = field(default_factory=dict)

    def state(self, name: str) -> InterfaceState:
        """The public view of this device as an InterfaceState named `name`."""
        public = keys.public_key(self.private_key) if self.private_key else None
        return InterfaceState(
            name=name, public_key=public, listen_port=self.listen_port, peers=dict(self.peers)
        )


def parse_errno(text: str) -> int:
    """The errno of a UAPI answer; UapiProtocolError if there is none (a truncated answer)."""
    for line in reversed(text.split("\n")):
        if line.startswith("errno="):
            try:
                return int(line.removeprefix("errno="))
            except ValueError as exc:
                raise UapiProtocolError(f"bad errno line {line!r}") from exc
    raise UapiProtocolError("UAPI answer has no errno line")


def check_set_response(text: str) -> None:
    """Raise UapiError if a `set` answer reports failure."""
    errno = parse_errno(text)
    if errno != 0:
        raise UapiError(f"wireguard-go rejected the set request (errno={errno})", errno=errno)


@dataclass(slots=True)
class _PeerBuilder:
    public_key: str
    allowed_ips: list[str] = field(default_factory=list)
    endpoint: str | None = None
    keepalive: int = 0
    handshake_sec: int = 0
    handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0

    def build(self) -> PeerState:
        handshake = None
        if self.handshake_sec or self.handshake_nsec:
            handshake = self.handshake_sec + self.handshake_nsec / 1e9
        return PeerState(
            public_key=self.public_key,
            allowed_ips=tuple(self.allowed_ips),
            endpoint=self.endpoint,
            persistent_keepalive=self.keepalive,
            latest_handshake=handshake,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
        )


_PEER_INTS = {
    "persistent_keepalive_interval": "keepalive",
    "last_handshake_time_sec": "handshake_sec",
    "last_handshake_time_nsec": "handshake_nsec",
    "rx_bytes": "rx_bytes",
    "tx_bytes": "tx_bytes",
}


def parse_get(text: str) -> UapiDevice:
    """Parse a `get=1` answer. UapiError for a non-zero errno, UapiProtocolError for a malformed one.

    Unknown keys are skipped: newer wireguard-go versions may add some, and ignoring them is what the
    protocol description asks of clients.
    """
    errno = parse_errno(text)
    if errno != 0:
        raise UapiError(f"wireguard-go rejected the get request (errno={errno})", errno=errno)
    private_key: str | None = None
    listen_port: int | None = None
    fwmark = 0
    peers: dict[str, PeerState] = {}
    current: _PeerBuilder | None = None
    for line in text.split("\n"):
        if not line or line.startswith("errno="):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiProtocolError(f"UAPI line without '=': {line[:40]!r}")
        if key == "public_key":
            if current is not None:
                peers[current.public_key] = current.build()
            current = _PeerBuilder(key_from_hex(value))
        elif current is None:
            if key == "private_key":
                private_key = key_from_hex(value)
            elif key == "listen_port":
                listen_port = _int(key, value)
            elif key == "fwmark":
                fwmark = _int(key, value)
        elif key == "allowed_ip":
            current.allowed_ips.append(value)
        elif key == "endpoint":
            current.endpoint = value
        elif key in _PEER_INTS:
            setattr(current, _PEER_INTS[key], _int(key, value))
    if current is not None:
        peers[current.public_key] = current.build()
    return UapiDevice(private_key=private_key, listen_port=listen_port, fwmark=fwmark, peers=peers)


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise UapiProtocolError(f"UAPI {key}={value!r} is not a number") from exc
