"""Broker credentials for nodes, written (hashed) into the Mosquitto-format password file.

A node chooses its own password and sends it with its RegisterRequest; `adopt` stores it for node ids that have
no entry yet and never replaces one (the sender is logged in as that node id, so it already proved the existing
password). `issue` (a registrar-generated password) remains for `credentials issue` and for older agents.

`Credentials` is the small interface the service uses; PasswordFileCredentials writes the real file atomically
(temp file, fsync, rename: a broker re-reading it never sees half a file) and then tells the broker to reload;
MemoryCredentials is the same contract in memory.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from meshcontract import access
from registrar.errors import CredentialsError


def new_password() -> str:
    """A fresh broker password."""
    return secrets.token_urlsafe(24)


class Credentials(Protocol):
    """Who has a broker password, and issuing one."""

    def has(self, username: str) -> bool: ...

    def issue(self, username: str) -> str: ...

    def adopt(self, passwords: Mapping[str, str]) -> list[str]: ...


class MemoryCredentials:
    """Credentials in memory (tests)."""

    def __init__(self) -> None:
        self.passwords: dict[str, str] = {}

    def has(self, username: str) -> bool:
        return username in self.passwords

    def issue(self, username: str) -> str:
        self.passwords[username] = new_password()
        return self.passwords[username]

    def adopt(self, passwords: Mapping[str, str]) -> list[str]:
        added = [user for user in passwords if user not in self.passwords]
        self.passwords.update({user: passwords[user] for user in added})
        return added


class PasswordFileCredentials:
    """The password file shared with the broker, plus an optional reload action run after each change."""

    def __init__(self, path: Path, *, reload: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self._reload = reload
        self._lock = threading.Lock()

    def _entries(self) -> dict[str, str]:
        try:
            return access.parse_password_file(self.path.read_text())
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CredentialsError(f"cannot read password file {self.path}: {exc}") from exc

    def has(self, username: str) -> bool:
        return username in self._entries()

    def issue(self, username: str) -> str:
        """Give `username` a new random password (replacing any old one); returns the clear password."""
        password = new_password()
        self.set(username, password)
        return password

    def adopt(self, passwords: Mapping[str, str]) -> list[str]:
        """Store the users of `passwords` that have no entry yet, in one atomic write and one reload.

        Returns the users added. Existing entries are kept as they are, whatever password is offered for them.
        """
        with self._lock:
            entries = self._entries()
            added = [user for user in passwords if user not in entries]
            if not added:
                return []
            for user in added:
                entries[user] = access.hash_password(passwords[user])
            write_atomically(self.path, access.render_password_file(entries))
        if self._reload is not None:
            self._reload()
        return added

    def set(self, username: str, password: str) -> None:
        """Write `username` with `password` into the file, then reload the broker."""
        with self._lock:
            entries = self._entries()
            entries[username] = access.hash_password(password)
            write_atomically(self.path, access.render_password_file(entries))
        if self._reload is not None:
            self._reload()


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` (mode 0600) so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CredentialsError(f"cannot write password file {path}: {exc}") from exc


def command_reload(command: list[str], *, timeout_s: float = 10.0) -> Callable[[], None]:
    """A reload action running `command` (e.g. signalling Mosquitto); CredentialsError if it fails."""

    def run() -> None:
        try:
            subprocess.run(command, check=True, timeout=timeout_s, capture_output=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise CredentialsError(f"broker reload command {command} failed: {exc}") from exc

    return run
