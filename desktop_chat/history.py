"""Per-peer message history: a small interface, an SQLite store on disk and an in-memory store.

Conversations are keyed by the peer's mesh IP (its identity); names are stored only to show them.
Both stores are safe to call from several threads (the server's connection threads, send workers, the UI).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from desktop_chat.errors import HistoryError

Direction = Literal["out", "in"]
# out: sending -> delivered | failed (failed -> sending again on retry); in: received
Status = Literal["sending", "delivered", "failed", "received"]


@dataclass(frozen=True, slots=True)
class Record:
    """One message in a conversation with `peer_ip`. `name` is who wrote it, for display only."""

    peer_ip: str
    msg_id: str
    direction: Direction
    name: str
    text: str
    sent_at: float
    status: Status
    reason: str | None = None
    read: bool = True
    seq: int = 0  # insertion order, assigned by the store


class HistoryStore(Protocol):
    """Where messages are kept. Every method is thread-safe."""

    def add(self, record: Record) -> bool:
        """Store a new message; False (and no change) if (peer_ip, msg_id) is already stored."""

    def set_status(self, peer_ip: str, msg_id: str, status: Status, reason: str | None = None) -> Record | None:
        """Change a message's status and reason; the updated record, or None if unknown."""

    def get(self, peer_ip: str, msg_id: str) -> Record | None:
        """One message, or None."""

    def conversation(self, peer_ip: str, *, limit: int = 500) -> list[Record]:
        """The last `limit` messages with `peer_ip`, oldest first."""

    def unread_counts(self) -> dict[str, int]:
        """Number of unread incoming messages per peer IP (peers with none are absent)."""

    def mark_read(self, peer_ip: str) -> int:
        """Mark every incoming message from `peer_ip` read; how many changed."""

    def fail_pending(self, reason: str) -> int:
        """Mark every message still `sending` as failed (used at startup after a crash); how many changed."""

    def close(self) -> None:
        """Release resources."""


class MemoryHistory:
    """A HistoryStore in memory, for tests and `send` without a state dir."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], Record] = {}
        self._seq = 0

    def add(self, record: Record) -> bool:
        with self._lock:
            key = (record.peer_ip, record.msg_id)
            if key in self._records:
                return False
            self._seq += 1
            self._records[key] = dataclasses.replace(record, seq=self._seq)
            return True

    def set_status(self, peer_ip: str, msg_id: str, status: Status, reason: str | None = None) -> Record | None:
        with self._lock:
            old = self._records.get((peer_ip, msg_id))
            if old is None:
                return None
            new = dataclasses.replace(old, status=status, reason=reason)
            self._records[(peer_ip, msg_id)] = new
            return new

    def get(self, peer_ip: str, msg_id: str) -> Record | None:
        with self._lock:
            return self._records.get((peer_ip, msg_id))

    def conversation(self, peer_ip: str, *, limit: int = 500) -> list[Record]:
        with self._lock:
            records = sorted((r for r in self._records.values() if r.peer_ip == peer_ip), key=lambda r: r.seq)
        return records[-limit:] if limit else []

    def unread_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for r in self._records.values():
                if r.direction == "in" and not r.read:
                    counts[r.peer_ip] = counts.get(r.peer_ip, 0) + 1
        return counts

    def mark_read(self, peer_ip: str) -> int:
        changed = 0
        with self._lock:
            for key, r in self._records.items():
                if r.peer_ip == peer_ip and r.direction == "in" and not r.read:
                    self._records[key] = dataclasses.replace(r, read=True)
                    changed += 1
        return changed

    def fail_pending(self, reason: str) -> int:
        changed = 0
        with self._lock:
            for key, r in self._records.items():
                if r.status == "sending":
                    self._records[key] = dataclasses.replace(r, status="failed", reason=reason)
                    changed += 1
        return changed

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    peer_ip   TEXT NOT NULL,
    msg_id    TEXT NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('out', 'in')),
    name      TEXT NOT NULL,
    text      TEXT NOT NULL,
    sent_at   REAL NOT NULL,
    status    TEXT NOT NULL,
    reason    TEXT,
    read      INTEGER NOT NULL DEFAULT 1,
    UNIQUE (peer_ip, msg_id)
);
CREATE INDEX IF NOT EXISTS messages_peer ON messages (peer_ip, seq);
"""
_COLUMNS = "peer_ip, msg_id, direction, name, text, sent_at, status, reason, read, seq"


def _row(row: tuple) -> Record:
    peer_ip, msg_id, direction, name, text, sent_at, status, reason, read, seq = row
    return Record(peer_ip, msg_id, direction, name, text, sent_at, status, reason, bool(read), seq)


class SqliteHistory:
    """A HistoryStore in one SQLite file (WAL), e.g. ~/.local/share/meshchat/history.db."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One connection shared by every thread, serialised by our own lock.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise HistoryError(f"cannot open history {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def _run(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise HistoryError(f"history {self.path}: {exc}") from exc

    def add(self, record: Record) -> bool:
        cur = self._run(
            "INSERT OR IGNORE INTO messages (peer_ip, msg_id, direction, name, text, sent_at, status, reason, read)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.peer_ip, record.msg_id, record.direction, record.name, record.text, record.sent_at,
             record.status, record.reason, int(record.read)),
        )
        return cur.rowcount == 1

    def set_status(self, peer_ip: str, msg_id: str, status: Status, reason: str | None = None) -> Record | None:
        self._run("UPDATE messages SET status = ?, reason = ? WHERE peer_ip = ? AND msg_id = ?",
                  (status, reason, peer_ip, msg_id))
        return self.get(peer_ip, msg_id)

    def get(self, peer_ip: str, msg_id: str) -> Record | None:
        row = self._run(f"SELECT {_COLUMNS} FROM messages WHERE peer_ip = ? AND msg_id = ?",
                        (peer_ip, msg_id)).fetchone()
        return _row(row) if row else None

    def conversation(self, peer_ip: str, *, limit: int = 500) -> list[Record]:
        rows = self._run(f"SELECT {_COLUMNS} FROM messages WHERE peer_ip = ? ORDER BY seq DESC LIMIT ?",
                         (peer_ip, limit)).fetchall()
        return [_row(r) for r in reversed(rows)]

    def unread_counts(self) -> dict[str, int]:
        rows = self._run("SELECT peer_ip, COUNT(*) FROM messages WHERE direction = 'in' AND read = 0"
                         " GROUP BY peer_ip").fetchall()
        return {ip: n for ip, n in rows}

    def mark_read(self, peer_ip: str) -> int:
        return self._run("UPDATE messages SET read = 1 WHERE peer_ip = ? AND direction = 'in' AND read = 0",
                         (peer_ip,)).rowcount

    def fail_pending(self, reason: str) -> int:
        return self._run("UPDATE messages SET status = 'failed', reason = ? WHERE status = 'sending'",
                         (reason,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
