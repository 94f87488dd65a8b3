"""Where the registrar's state survives restarts: members (with their credential hashes), join tokens, revoked
keys, the revision counter, quarantined IPs.

`Store` is the small interface the single writer uses: `load` once at start, then `commit_many` with the engine
Deltas of a whole batch (up to registrar.writer.MAX_BATCH = 256 drained messages) in one transaction: group
commit, one fsync per burst. Heartbeats of active members yield no Delta and write nothing. SqliteStore is the
real one (WAL, synchronous=FULL: a commit that returned is on disk, so a kill -9 at any moment loses no
acknowledged registration, because the writer commits before it publishes a reply). MemoryStore is the same
contract in memory, for tests.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from meshcontract.messages import Endpoint, MemberState
from registrar.engine import Delta, RevokedKey
from registrar.errors import StoreError
from registrar.ipam import Quarantined
from registrar.membership import Member
from registrar.tokens import JoinToken

SCHEMA_VERSION = 2


@dataclass(slots=True)
class StoredState:
    """Everything `load` returns."""

    members: list[Member] = field(default_factory=list)
    tokens: list[JoinToken] = field(default_factory=list)
    revision: int = 0
    quarantine: list[Quarantined] = field(default_factory=list)
    revoked: list[RevokedKey] = field(default_factory=list)


class Store(Protocol):
    """Durable registrar state. `commit` is atomic: all of a Delta or none of it."""

    def load(self) -> StoredState: ...

    def load_tokens(self) -> list[JoinToken]: ...

    def commit(self, delta: Delta) -> None: ...

    def commit_many(self, deltas: list[Delta]) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """Store in memory: the same contract as SqliteStore without a disk."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.members: dict[str, Member] = {}
        self.tokens: dict[str, JoinToken] = {}
        self.revision = 0
        self.quarantine: list[Quarantined] = []
        self.revoked: dict[str, RevokedKey] = {}
        self.commits = 0

    def load(self) -> StoredState:
        with self._lock:
            return StoredState(
                list(self.members.values()),
                list(self.tokens.values()),
                self.revision,
                list(self.quarantine),
                list(self.revoked.values()),
            )

    def load_tokens(self) -> list[JoinToken]:
        with self._lock:
            return list(self.tokens.values())

    def commit(self, delta: Delta) -> None:
        self.commit_many([delta])

    def commit_many(self, deltas: list[Delta]) -> None:
        """Apply `deltas` in order, all or none."""
        with self._lock:
            members, tokens, revoked = dict(self.members), dict(self.tokens), dict(self.revoked)
            revision, quarantine = self.revision, list(self.quarantine)
            for delta in deltas:
                for node_id in delta.delete_members:
                    members.pop(node_id, None)
                for m in delta.upsert_members:
                    members[m.node_id] = m
                ips = [m.mesh_ip for m in members.values()]
                if len(ips) != len(set(ips)):
                    raise StoreError("commit would give two members the same mesh IP")
                for token_id in delta.delete_tokens:
                    tokens.pop(token_id, None)
                for t in delta.upsert_tokens:
                    tokens[t.id] = t
                if delta.revision is not None:
                    revision = delta.revision
                if delta.quarantine is not None:
                    quarantine = list(delta.quarantine)
                for key in delta.delete_revoked:
                    revoked.pop(key, None)
                for r in delta.upsert_revoked:
                    revoked[r.public_key] = r
            self.members, self.tokens, self.revision, self.quarantine = members, tokens, revision, quarantine
            self.revoked = revoked
            self.commits += 1

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    node_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,
    mesh_ip TEXT NOT NULL UNIQUE,
    endpoints TEXT NOT NULL,
    listen_port INTEGER NOT NULL,
    state TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    joined_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    unreachable_since REAL,
    password_hash TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    expires_at REAL,
    reusable INTEGER NOT NULL,
    max_uses INTEGER,
    uses INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (ip TEXT PRIMARY KEY, owner TEXT NOT NULL, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_keys (public_key TEXT PRIMARY KEY, node_id TEXT NOT NULL, revoked_at REAL NOT NULL);
"""


class SqliteStore:
    """The registrar's SQLite database (registrar.db in the state dir). Safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so one Delta is exactly one transaction.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: in WAL mode NORMAL may lose the last commits on power loss; acknowledged means on disk.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(members)")}
            if "password_hash" not in columns:  # a version 1 database: members had no credential column
                self._db.execute("ALTER TABLE members ADD COLUMN password_hash TEXT NOT NULL DEFAULT ''")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('revision', '0')")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the registrar database {self.path}: {exc}") from exc

    def load(self) -> StoredState:
        with self._lock:
            try:
                members = [_member(row) for row in self._db.execute("SELECT * FROM members ORDER BY node_id")]
                tokens = [_token(row) for row in self._db.execute("SELECT * FROM tokens")]
                (revision,) = self._db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
                quarantine = [
                    Quarantined(*row) for row in self._db.execute("SELECT ip, owner, until FROM quarantine")
                ]
                revoked = [
                    RevokedKey(*row)
                    for row in self._db.execute("SELECT public_key, node_id, revoked_at FROM revoked_keys")
                ]
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read {self.path}: {exc}") from exc
        return StoredState(members, tokens, int(revision), quarantine, revoked)

    def load_tokens(self) -> list[JoinToken]:
        with self._lock:
            try:
                return [_token(row) for row in self._db.execute("SELECT * FROM tokens")]
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read tokens from {self.path}: {exc}") from exc

    def commit(self, delta: Delta) -> None:
        self.commit_many([delta])

    def commit_many(self, deltas: list[Delta]) -> None:
        """Apply `deltas` in order in one transaction (one fsync): all of them or none."""
        deltas = [d for d in deltas if not d.is_empty()]
        if not deltas:
            return
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                for delta in deltas:
                    _write(db, delta)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StoreError(f"cannot write to {self.path}: {exc}") from exc

    def add_token(self, token: JoinToken) -> None:
        """Insert one token (the CLI, while the registrar may be running: it re-reads tokens before use)."""
        self.commit(Delta(upsert_tokens=(token,)))

    def delete_token(self, token_id: str) -> bool:
        """Delete one token by id; True if it existed."""
        with self._lock:
            try:
                cur = self._db.execute("DELETE FROM tokens WHERE id=?", (token_id,))
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write to {self.path}: {exc}") from exc
            return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


_MEMBER_COLUMNS = (
    "node_id", "name", "public_key", "mesh_ip", "endpoints", "listen_port", "state", "epoch", "revision",
    "joined_at", "updated_at", "last_seen", "unreachable_since", "password_hash",
)  # fmt: skip
_UPSERT_MEMBER = (
    f"INSERT INTO members ({', '.join(_MEMBER_COLUMNS)}) VALUES ({', '.join('?' * len(_MEMBER_COLUMNS))}) "
    f"ON CONFLICT(node_id) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in _MEMBER_COLUMNS[1:])}"
)


def _write(db: sqlite3.Connection, delta: Delta) -> None:
    db.executemany("DELETE FROM members WHERE node_id=?", [(i,) for i in delta.delete_members])
    db.executemany(
        # An upsert on node_id only: INSERT OR REPLACE would resolve a mesh_ip or public_key clash by
        # silently deleting the *other* member; this way such a bug fails the whole transaction instead.
        _UPSERT_MEMBER,
        [_member_row(m) for m in delta.upsert_members],
    )
    db.executemany("DELETE FROM tokens WHERE id=?", [(i,) for i in delta.delete_tokens])
    db.executemany(
        "INSERT OR REPLACE INTO tokens VALUES (?,?,?,?,?,?,?)",
        [
            (t.id, t.hash, t.created_at, t.expires_at, int(t.reusable), t.max_uses, t.uses)
            for t in delta.upsert_tokens
        ],
    )
    if delta.revision is not None:
        db.execute("UPDATE meta SET value=? WHERE key='revision'", (str(delta.revision),))
    db.executemany("DELETE FROM revoked_keys WHERE public_key=?", [(k,) for k in delta.delete_revoked])
    db.executemany(
        "INSERT OR REPLACE INTO revoked_keys VALUES (?,?,?)",
        [(r.public_key, r.node_id, r.revoked_at) for r in delta.upsert_revoked],
    )
    if delta.quarantine is not None:
        db.execute("DELETE FROM quarantine")
        db.executemany(
            "INSERT INTO quarantine VALUES (?,?,?)", [(q.ip, q.owner, q.until) for q in delta.quarantine]
        )


def _member_row(m: Member) -> tuple:
    endpoints = json.dumps([e.model_dump() for e in m.endpoints])
    return (
        m.node_id, m.name, m.public_key, m.mesh_ip, endpoints, m.listen_port, m.state.value, m.epoch,
        m.revision, m.joined_at, m.updated_at, m.last_seen, m.unreachable_since, m.password_hash,
    )  # fmt: skip


def _member(row: tuple) -> Member:
    (node_id, name, key, ip, endpoints, port, state, epoch, revision, joined, updated, seen, down, pw) = row
    return Member(
        node_id=node_id,
        name=name,
        public_key=key,
        mesh_ip=ip,
        # Not strict: the JSON column holds the endpoint kind as text, which the strict model takes only from JSON.
        endpoints=tuple(Endpoint.model_validate(e, strict=False) for e in json.loads(endpoints)),
        listen_port=port,
        state=MemberState(state),
        epoch=epoch,
        revision=revision,
        joined_at=joined,
        updated_at=updated,
        last_seen=seen,
        unreachable_since=down,
        password_hash=pw,
    )


def _token(row: tuple) -> JoinToken:
    token_id, digest, created, expires, reusable, max_uses, uses = row
    return JoinToken(token_id, digest, created, expires, bool(reusable), max_uses, uses)
