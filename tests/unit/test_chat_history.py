"""The history stores: the same behaviour from the in-memory and the SQLite implementation."""

from __future__ import annotations

import pytest

from desktop_chat.history import MemoryHistory, Record, SqliteHistory


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryHistory() if request.param == "memory" else SqliteHistory(tmp_path / "state" / "history.db")
    try:
        yield s
    finally:
        s.close()


def out(peer, mid, text="hi", status="sending"):
    return Record(peer_ip=peer, msg_id=mid, direction="out", name="me", text=text, sent_at=1.0, status=status)


def inc(peer, mid, text="yo"):
    return Record(peer_ip=peer, msg_id=mid, direction="in", name="them", text=text, sent_at=2.0,
                  status="received", read=False)


def test_add_is_idempotent_per_peer_and_id(store):
    assert store.add(out("100.96.0.2", "m1"))
    assert not store.add(out("100.96.0.2", "m1", text="changed"))
    assert store.add(out("100.96.0.3", "m1"))
    assert store.get("100.96.0.2", "m1").text == "hi"


def test_conversation_is_per_peer_in_order_and_limited(store):
    for i in range(5):
        store.add(out("100.96.0.2", f"o{i}", text=f"out {i}"))
        store.add(inc("100.96.0.2", f"i{i}", text=f"in {i}"))
    store.add(out("100.96.0.3", "other"))
    texts = [r.text for r in store.conversation("100.96.0.2")]
    assert texts == [t for i in range(5) for t in (f"out {i}", f"in {i}")]
    assert [r.text for r in store.conversation("100.96.0.2", limit=3)] == ["in 3", "out 4", "in 4"]
    assert [r.msg_id for r in store.conversation("100.96.0.3")] == ["other"]
    assert store.conversation("100.96.0.9") == []


@pytest.mark.parametrize(("status", "reason"), [("delivered", None), ("failed", "connection refused")])
def test_set_status(store, status, reason):
    store.add(out("100.96.0.2", "m1"))
    updated = store.set_status("100.96.0.2", "m1", status, reason)
    assert (updated.status, updated.reason) == (status, reason)
    assert store.get("100.96.0.2", "m1") == updated
    assert store.set_status("100.96.0.2", "nope", "failed", "x") is None


def test_unread_counts_and_mark_read(store):
    store.add(inc("100.96.0.2", "a"))
    store.add(inc("100.96.0.2", "b"))
    store.add(inc("100.96.0.3", "c"))
    store.add(out("100.96.0.2", "d"))
    assert store.unread_counts() == {"100.96.0.2": 2, "100.96.0.3": 1}
    assert store.mark_read("100.96.0.2") == 2
    assert store.mark_read("100.96.0.2") == 0
    assert store.unread_counts() == {"100.96.0.3": 1}


def test_fail_pending_marks_only_sending(store):
    store.add(out("100.96.0.2", "a"))
    store.add(out("100.96.0.2", "b", status="delivered"))
    assert store.fail_pending("interrupted") == 1
    assert store.get("100.96.0.2", "a").status == "failed"
    assert store.get("100.96.0.2", "a").reason == "interrupted"
    assert store.get("100.96.0.2", "b").status == "delivered"


def test_sqlite_history_survives_a_restart(tmp_path):
    path = tmp_path / "history.db"
    first = SqliteHistory(path)
    first.add(out("100.96.0.2", "m1", text="before restart", status="delivered"))
    first.add(inc("100.96.0.2", "m2", text="unread"))
    first.close()
    second = SqliteHistory(path)
    try:
        assert [r.text for r in second.conversation("100.96.0.2")] == ["before restart", "unread"]
        assert second.unread_counts() == {"100.96.0.2": 1}
    finally:
        second.close()
