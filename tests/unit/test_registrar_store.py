"""The registrar's store: round trips through SQLite, reopen, and kill -9 during writes losing nothing acked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from meshcontract.messages import Endpoint, EndpointKind, EnrollRequest, MeshSettings
from registrar import engine
from registrar.liveness import LivenessPolicy
from registrar.store import MemoryStore, SqliteStore

CONFIG = engine.Config(
    mesh=MeshSettings(
        mesh="lab",
        network="10.3.0.0/16",
        heartbeat_interval_s=1,
        heartbeat_ttl_s=3,
        persistent_keepalive_s=0,
        mtu=1420,
    ),
    policy=LivenessPolicy(ttl_s=3, expiry_s=30, grace_s=3),
    require_token=False,
)


def key(n: int) -> str:
    import base64

    return base64.b64encode(n.to_bytes(4, "big") * 8).decode()


ENDPOINTS = [
    Endpoint(host="vpn.example.org", port=51820, kind=EndpointKind.PUBLIC),
    Endpoint(host="198.51.100.7", port=51820, kind=EndpointKind.REFLEXIVE),
    Endpoint(host="192.168.1.7", port=51820),
]


def join(state: engine.CoreState, n: int, *, now: float) -> engine.Outcome:
    """Enroll node n (tokens are not required in CONFIG), advertising an endpoint of every kind."""
    request = EnrollRequest(
        node_id=f"n{n}", name=f"node {n}", public_key=key(n), listen_port=51820,
        token="mvj_unused-token-0000000000", password="node-password-00000", endpoints=ENDPOINTS,
    )  # fmt: skip
    return engine.enroll(state, request, now=now, config=CONFIG, password_hash=f"$7$hash-of-n{n}")


def restore(store, now=0.0) -> engine.CoreState:
    s = store.load()
    return engine.restore(
        members=s.members,
        join_tokens=s.tokens,
        revision=s.revision,
        quarantine=s.quarantine,
        network="10.3.0.0/16",
        quarantine_s=60,
        started_at=now,
        revoked=s.revoked,
    )


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request, tmp_path):
    if request.param == "memory":
        shared = MemoryStore()
        yield lambda: shared
    else:
        opened = []

        def make():
            store = SqliteStore(tmp_path / "registrar.db")
            opened.append(store)
            return store

        yield make
        for s in opened:
            s.close()


def test_round_trip_and_reopen(make_store):
    store = make_store()
    state = restore(store)
    out = engine.create_token(state, secret="tok", now=1, reusable=True, max_uses=5)
    store.commit(out.delta)
    state = out.state
    for n in range(5):
        out = join(state, n, now=2)
        store.commit(out.delta)
        state = out.state
    out = engine.remove_member(state, "n2", now=3)
    store.commit(out.delta)
    state = out.state

    again = restore(make_store(), now=10)
    assert dict(again.membership.members) == dict(state.membership.members)
    assert again.membership.revision == state.membership.revision == 6
    assert dict(again.tokens) == dict(state.tokens)
    assert dict(again.membership.ipam.quarantine) == dict(state.membership.ipam.quarantine)
    assert dict(again.revoked) == dict(state.revoked) and key(2) in again.revoked, "n2's key stays revoked"
    assert again.membership.members["n1"].password_hash == "$7$hash-of-n1", "credential hashes survive"
    assert list(again.membership.members["n1"].endpoints) == ENDPOINTS, "endpoints keep their kind"
    # a newcomer never gets the quarantined address of n2
    out = join(again, 9, now=11)
    assert out.enroll_reply.mesh_ip not in again.membership.ipam.quarantine


def test_memory_store_refuses_duplicate_ips():
    store = MemoryStore()
    a = join(restore(store), 1, now=1)
    store.commit(a.delta)
    b = join(restore(MemoryStore()), 2, now=1)  # same IP, other node
    from registrar.errors import StoreError

    with pytest.raises(StoreError):
        store.commit(b.delta)


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    from test_registrar_store import CONFIG, join, restore
    from registrar import engine
    from registrar.store import SqliteStore

    store = SqliteStore(sys.argv[1])
    state = restore(store)
    n = int(sys.argv[2])
    while True:
        out = join(state, n, now=float(n))
        store.commit(out.delta)
        state = out.state
        # acknowledged only after commit returned: what the service does before publishing a reply
        print(f"{out.enroll_reply.node_id} {out.enroll_reply.mesh_ip}", flush=True)
        n += 1
    """
)


def test_kill_9_loses_no_acknowledged_registration(tmp_path):
    db = tmp_path / "registrar.db"
    acked: dict[str, str] = {}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    start = 0
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(start), os.path.dirname(os.path.abspath(__file__))],
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        try:
            deadline = time.monotonic() + 30
            got = 0
            while got < 40 + 13 * round_ and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                node, ip = line.split()
                acked[node] = ip
                got += 1
            assert got > 0, "writer produced nothing"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        store = SqliteStore(db)
        try:
            members = {m.node_id: m.mesh_ip for m in store.load().members}
        finally:
            store.close()
        for node, ip in acked.items():
            assert members.get(node) == ip, f"acknowledged {node} lost or moved after kill -9"
        assert len(set(members.values())) == len(members)
        start = max(int(n[1:]) for n in members) + 1


def test_commit_many_is_all_or_nothing(make_store):
    from registrar.errors import StoreError

    store = make_store()
    a = join(restore(store), 1, now=1)
    b = join(a.state, 2, now=1)
    clash = join(restore(MemoryStore()), 3, now=1)  # n3 on n1's address
    with pytest.raises(StoreError):
        store.commit_many([a.delta, b.delta, clash.delta])
    assert store.load().members == [] and store.load().revision == 0
    store.commit_many([a.delta, b.delta])
    assert [m.node_id for m in make_store().load().members] == ["n1", "n2"]


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    """Members stored before credentials moved into the registrar keep their rows; they get an empty hash (so
    they cannot authenticate over HTTP until they enroll again) and revoked keys start empty."""
    import sqlite3

    db = tmp_path / "registrar.db"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema', '1'), ('revision', '4');"
        "CREATE TABLE members (node_id TEXT PRIMARY KEY, name TEXT NOT NULL, public_key TEXT NOT NULL UNIQUE,"
        " mesh_ip TEXT NOT NULL UNIQUE, endpoints TEXT NOT NULL, listen_port INTEGER NOT NULL, state TEXT NOT NULL,"
        " epoch INTEGER NOT NULL, revision INTEGER NOT NULL, joined_at REAL NOT NULL, updated_at REAL NOT NULL,"
        " last_seen REAL NOT NULL, unreachable_since REAL);"
        f"INSERT INTO members VALUES ('n1', 'old', '{key(1)}', '10.3.0.1', '[]', 51820, 'active', 3, 4, 1, 1, 1, NULL);"
    )
    conn.commit()
    conn.close()
    store = SqliteStore(db)
    try:
        loaded = store.load()
        assert [(m.node_id, m.password_hash) for m in loaded.members] == [("n1", "")]
        assert loaded.revision == 4 and loaded.revoked == []
    finally:
        store.close()
