"""Key generation, derivation and the 0600 private key file."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import threading

import pytest

from wgctl import keys
from wgctl.errors import InvalidKeyError, KeyFileError

# RFC 7748 section 6.1 test vector (Alice), in base64.
RFC_PRIVATE = base64.b64encode(
    bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
).decode()
RFC_PUBLIC = base64.b64encode(
    bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
).decode()


def test_public_key_matches_rfc7748_vector():
    assert keys.public_key(RFC_PRIVATE) == RFC_PUBLIC


def test_generated_key_is_clamped_and_unique():
    first, second = keys.generate_private_key(), keys.generate_private_key()
    assert first != second
    raw = base64.b64decode(first)
    assert len(raw) == 32 and raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (wg) not installed")
def test_public_key_agrees_with_wg_pubkey():
    private = keys.generate_private_key()
    out = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True)
    assert keys.public_key(private) == out.stdout.strip()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("", id="empty"),
        pytest.param("not base64!", id="not-base64"),
        pytest.param(base64.b64encode(b"x" * 31).decode(), id="31-bytes"),
        pytest.param(base64.b64encode(b"x" * 33).decode(), id="33-bytes"),
    ],
)
def test_invalid_keys_are_rejected(bad):
    assert not keys.is_valid_key(bad)
    with pytest.raises(InvalidKeyError):
        keys.public_key(bad)


def test_write_private_key_is_0600_and_readable_back(tmp_path):
    path = tmp_path / "private.key"
    key = keys.write_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.read_private_key(path) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.key"], "temporary file left behind"


def test_write_private_key_ignores_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        keys.write_private_key(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_write_private_key_never_overwrites(tmp_path):
    path = tmp_path / "private.key"
    first = keys.write_private_key(path)
    with pytest.raises(KeyFileError):
        keys.write_private_key(path)
    assert keys.read_private_key(path) == first


def test_file_is_never_world_readable_while_being_written(tmp_path):
    # Watch the directory while keys are written: every file that shows up must already be 0600.
    seen: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for entry in os.scandir(tmp_path):
                try:
                    seen.append(stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(200):
            keys.write_private_key(tmp_path / f"k{i}")
    finally:
        stop.set()
        watcher.join()
    assert seen and set(seen) == {0o600}


def test_load_or_create_creates_once_then_reuses(tmp_path):
    path = tmp_path / "private.key"
    key = keys.load_or_create(path)
    assert keys.load_or_create(path) == key


def test_read_tightens_loose_permissions(tmp_path, caplog):
    path = tmp_path / "private.key"
    key = keys.write_private_key(path)
    path.chmod(0o644)
    assert keys.read_private_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "setting it to 0600" in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage\n", id="garbage"),
        pytest.param(b"\xff" * 44, id="binary"),
    ],
)
def test_read_rejects_files_without_a_key(tmp_path, content):
    path = tmp_path / "private.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        keys.read_private_key(path)


def test_missing_directory_is_a_key_file_error(tmp_path):
    with pytest.raises(KeyFileError):
        keys.write_private_key(tmp_path / "nope" / "private.key")
