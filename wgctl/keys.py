"""WireGuard keys: generation, derivation and the node's private key file.

Keys travel as standard base64 of 32 bytes, exactly as `wg genkey` / `wg pubkey` print them, so a key made
here can be checked with `wg pubkey < private.key`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import secrets
import stat
from pathlib import Path

from wgctl import libcrypto
from wgctl.errors import InvalidKeyError, KeyFileError

log = logging.getLogger(__name__)

KEY_LEN = 32


def decode_key(key: str) -> bytes:
    """The 32 raw bytes of a base64 key; InvalidKeyError if it is not one."""
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidKeyError(f"not a base64 WireGuard key: {key[:8]!r}...") from exc
    if len(raw) != KEY_LEN:
        raise InvalidKeyError(f"a WireGuard key is {KEY_LEN} bytes, got {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    """Base64 text of 32 raw key bytes."""
    if len(raw) != KEY_LEN:
        raise InvalidKeyError(f"a WireGuard key is {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def is_valid_key(key: str) -> bool:
    """True if `key` is base64 of exactly 32 bytes."""
    try:
        decode_key(key)
    except InvalidKeyError:
        return False
    return True


def generate_private_key() -> str:
    """A fresh Curve25519 private key in base64, clamped like `wg genkey` prints it."""
    raw = bytearray(secrets.token_bytes(KEY_LEN))
    # Clamp as RFC 7748 and `wg genkey` do; X25519 clamps on use anyway, but a clamped key is byte-identical
    # to what the wg tools would have produced, which keeps comparisons across tools simple.
    raw[0] &= 248
    raw[31] &= 127
    raw[31] |= 64
    return encode_key(bytes(raw))


# Remembered: wgctl reports an interface's public key with every read (an agent reads at every heartbeat), and
# the X25519 derivation costs ~0.1 ms of CPU each time on an idle machine. A process holds only a few keys.
@functools.lru_cache(maxsize=8)
def public_key(private_key: str) -> str:
    """The base64 public key of a base64 private key."""
    return encode_key(libcrypto.x25519_public_key(decode_key(private_key)))


def write_private_key(path: str | os.PathLike[str], private_key: str | None = None) -> str:
    """Write a private key (a new one if None) to `path`, mode 0600, and return it.

    The file never exists with looser permissions, not even briefly: a temporary file in the same directory
    is created with O_CREAT|O_EXCL and mode 0600, filled and fsynced, then hard-linked to `path`. The link
    fails if `path` already exists, so an existing key is never overwritten and a crash leaves either no key
    or a complete one. KeyFileError if `path` exists or cannot be written.
    """
    key = private_key if private_key is not None else generate_private_key()
    decode_key(key)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot create private key file in {target.parent}: {exc}") from exc
    try:
        # The mode passed to os.open is masked by the umask, which can only remove bits; fchmod pins it to
        # exactly 0600 in case a caller runs with an odd umask such as 0o177 (which would drop owner write).
        os.fchmod(fd, 0o600)
        os.write(fd, (key + "\n").encode("ascii"))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(tmp)
        raise KeyFileError(f"cannot write private key file {tmp}: {exc}") from exc
    os.close(fd)
    try:
        os.link(tmp, target)
    except FileExistsError as exc:
        raise KeyFileError(f"private key file {target} already exists; not overwriting it") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot install private key file {target}: {exc}") from exc
    finally:
        _unlink_quietly(tmp)
    _fsync_dir(target.parent)
    return key


def read_private_key(path: str | os.PathLike[str]) -> str:
    """Read a private key file. A group- or world-accessible file is tightened to 0600 with a warning."""
    target = Path(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileError(f"cannot open private key file {target}: {exc}") from exc
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            # Refusing to start would take the node off the mesh for a permissions slip; the key may already
            # have leaked, which only rotating it fixes, but tightening stops it leaking further.
            log.warning("private key file %s had mode %o; setting it to 0600", target, mode)
            os.fchmod(fd, 0o600)
        data = os.read(fd, 4096)
    except OSError as exc:
        raise KeyFileError(f"cannot read private key file {target}: {exc}") from exc
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii").strip()
        decode_key(text)
    except (UnicodeDecodeError, InvalidKeyError) as exc:
        raise KeyFileError(f"private key file {target} does not hold a WireGuard key") from exc
    return text


def load_or_create(path: str | os.PathLike[str]) -> str:
    """The private key stored at `path`, creating the file (0600) with a new key if it does not exist."""
    target = Path(path)
    if not target.exists():
        try:
            return write_private_key(target)
        except KeyFileError:
            # Another process may have created it between the check and the link; its key wins.
            if not target.exists():
                raise
    return read_private_key(target)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: Path) -> None:
    # Makes the new directory entry durable, so a power loss right after start-up cannot lose the key the
    # node has already registered with.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
