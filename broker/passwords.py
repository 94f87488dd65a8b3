"""The embedded broker's accounts: a Mosquitto-format password file, read again at every check."""

from __future__ import annotations

import logging
from pathlib import Path

from meshcontract import access

log = logging.getLogger(__name__)


class PasswordFile:
    """A Mosquitto-format password file, read again at every check.

    The file is small and logins are rare, so it is simply read each time: a stat-based cache can miss a
    same-size rewrite within one mtime tick (ext4 stamps are jiffy-granular), and a password issued by the
    registrar must work at once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._text: str | None = None
        self._entries: dict[str, str] = {}

    def _refresh(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            if self._text:
                log.warning("password file %s is missing: nobody can log in with a password", self.path)
            text = ""
        if text != self._text:
            self._entries = access.parse_password_file(text)
            self._text = text
            log.info("loaded %d broker users from %s", len(self._entries), self.path)

    def users(self) -> set[str]:
        """Every username the file holds now."""
        self._refresh()
        return set(self._entries)

    def check(self, username: str, password: str) -> bool:
        """True if the file holds `username` with `password`."""
        self._refresh()
        hashed = self._entries.get(username)
        return hashed is not None and access.verify_password(password, hashed)
