"""The agent's state directory: identity, credentials, epoch, registration and last complete membership.

Files (all written atomically: temporary file, fsync, rename):
    private.key        WireGuard private key, 0600 (wgctl.keys); never leaves the machine
    node_id            the node id, generated once
    broker_password    the node's own broker password, generated here before enrolling, 0600; sent once, to
                       the registrar over pinned TLS
    enrollment.json    where the registrar and broker are and the registrar's signing key (after enrolling)
    ca.pem             the registrar's CA certificate, pinned by the join token (after enrolling)
    epoch              the last session epoch used
    registration.json  mesh IP, prefix and mesh settings from the last successful registration
    membership.json    the last complete membership, to restore tunnels before the broker is reachable
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from meshcontract.messages import MeshSettings
from meshcontract.topics import is_valid_id
from nodeagent.errors import StateDirError
from nodeagent.membership import MemberTable
from wgctl import keys
from wgctl.errors import KeyFileError

log = logging.getLogger(__name__)


def generate_node_id() -> str:
    """A fresh node id: "n" and 10 lowercase base32 characters (50 random bits)."""
    return "n" + base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()[:10]


class Enrollment(BaseModel):
    """What a successful enrollment left us: how to reach the control plane and whom to trust on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mesh: str
    node_id: str
    registrar_url: str
    broker_url: str | None = None
    signing_key: str  # the registrar's Ed25519 public key: membership must be signed by it
    ca_pin: str


@dataclass(frozen=True, slots=True)
class Registration:
    """What the registrar assigned us: our mesh address and the mesh-wide settings."""

    mesh_ip: str
    prefix_len: int
    settings: MeshSettings

    def to_json(self) -> str:
        return json.dumps(
            {"mesh_ip": self.mesh_ip, "prefix_len": self.prefix_len, "settings": self.settings.model_dump()},
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Registration:
        data = json.loads(text)
        return cls(
            mesh_ip=str(data["mesh_ip"]),
            prefix_len=int(data["prefix_len"]),
            settings=MeshSettings.model_validate(data["settings"], strict=False),
        )


def write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Replace `path` with `text` so a crash leaves the old or the new content, never a torn file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # not subject to the umask
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise StateDirError(f"cannot write {path}: {exc}") from exc


class StateStore:
    """Reads and writes the files of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)

    def ensure_dir(self) -> None:
        """Create the directory (0700: it holds the private key and broker password)."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateDirError(f"cannot create state directory {self.dir}: {exc}") from exc

    def _read(self, name: str) -> str | None:
        try:
            return (self.dir / name).read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateDirError(f"cannot read {self.dir / name}: {exc}") from exc

    # -- identity ---------------------------------------------------------------------------------------
    def private_key(self) -> str:
        """The WireGuard private key, created (0600) on first use."""
        try:
            return keys.load_or_create(self.dir / "private.key")
        except KeyFileError as exc:
            raise StateDirError(str(exc)) from exc

    def replace_private_key(self, private_key: str) -> None:
        """Replace the WireGuard private key (0600, atomically: a crash leaves the old key or the new one)."""
        keys.decode_key(private_key)
        write_atomic(self.dir / "private.key", private_key + "\n", mode=0o600)

    def node_id(self, configured: str | None = None) -> str:
        """The node id: `configured` if given (and then persisted), else the stored one, else a new one."""
        stored = (self._read("node_id") or "").strip() or None
        if stored is not None and not is_valid_id(stored):
            raise StateDirError(f"{self.dir / 'node_id'} holds an invalid node id {stored!r}")
        if configured is not None:
            if stored is not None and stored != configured:
                log.warning("node id changed from %s to %s by configuration", stored, configured)
            if stored != configured:
                write_atomic(self.dir / "node_id", configured + "\n")
            return configured
        if stored is None:
            stored = generate_node_id()
            write_atomic(self.dir / "node_id", stored + "\n")
            log.info("generated node id %s", stored, extra={"node_id": stored})
        return stored

    # -- credentials ------------------------------------------------------------------------------------
    def broker_password(self) -> str | None:
        """The node's stored broker password, if any."""
        text = self._read("broker_password")
        return text.strip() or None if text is not None else None

    def save_broker_password(self, password: str) -> None:
        write_atomic(self.dir / "broker_password", password + "\n", mode=0o600)

    def own_broker_password(self) -> str:
        """The node's own broker password, created (random, 192 bits, 0600) on first use.

        Persisted before it is ever sent, so whatever the registrar stores is what we will log in with.
        """
        stored = self.broker_password()
        if stored is not None:
            return stored
        password = secrets.token_urlsafe(24)
        self.save_broker_password(password)
        return password

    # -- enrollment -------------------------------------------------------------------------------------
    def enrollment(self) -> Enrollment | None:
        """What enrolling told us, None if this node never enrolled (or the file is unreadable)."""
        text = self._read("enrollment.json")
        if text is None:
            return None
        try:
            return Enrollment.model_validate_json(text)
        except ValidationError as exc:
            log.warning("ignoring unreadable %s: %s", self.dir / "enrollment.json", exc)
            return None

    def save_enrollment(self, enrollment: Enrollment, ca_pem: str) -> None:
        """Persist the CA first: an enrollment.json on disk always comes with the CA it was made with."""
        write_atomic(self.dir / "ca.pem", ca_pem)
        write_atomic(self.dir / "enrollment.json", enrollment.model_dump_json(indent=1))

    def forget_enrollment(self) -> None:
        """The registrar no longer knows us (removed, expired): the next start enrolls again with a token."""
        for name in ("enrollment.json", "registration.json"):
            (self.dir / name).unlink(missing_ok=True)

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    # -- session ----------------------------------------------------------------------------------------
    def epoch(self) -> int | None:
        """The last epoch used, None if never (or unreadable: a new epoch from the clock is safe then)."""
        text = self._read("epoch")
        if text is None:
            return None
        try:
            return int(text.strip())
        except ValueError:
            log.warning("ignoring unreadable %s", self.dir / "epoch")
            return None

    def save_epoch(self, epoch: int) -> None:
        write_atomic(self.dir / "epoch", f"{epoch}\n")

    # -- mesh state -------------------------------------------------------------------------------------
    def registration(self) -> Registration | None:
        text = self._read("registration.json")
        if text is None:
            return None
        try:
            return Registration.from_json(text)
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            log.warning("ignoring unreadable %s: %s", self.dir / "registration.json", exc)
            return None

    def save_registration(self, registration: Registration) -> None:
        write_atomic(self.dir / "registration.json", registration.to_json())

    def membership(self) -> MemberTable | None:
        """The last complete membership persisted, None if none (or unreadable: we then wait for the broker)."""
        text = self._read("membership.json")
        if text is None:
            return None
        try:
            return MemberTable.from_json(text)
        except (ValueError, ValidationError) as exc:
            log.warning("ignoring unreadable %s: %s", self.dir / "membership.json", exc)
            return None

    def save_membership(self, membership: MemberTable) -> None:
        write_atomic(self.dir / "membership.json", membership.to_json())
