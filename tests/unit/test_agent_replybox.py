"""Where registration replies land and registrations wait (nodeagent.registration.ReplyBox)."""

from __future__ import annotations

import threading

import pytest

from meshcontract.messages import RegisterReply
from nodeagent.registration import ReplyBox


def reply(request_id: str) -> RegisterReply:
    return RegisterReply(request_id=request_id, ok=True, node_id="n1", mesh_ip="100.96.0.7", prefix_len=16)


@pytest.mark.parametrize(
    ("delivered", "lost", "kicked", "expected"),
    [
        pytest.param(["request1"], False, False, "request1", id="the reply is there"),
        pytest.param(["request1"], True, False, "request1", id="the reply is there though the connection is lost"),
        pytest.param([], True, False, None, id="connection lost"),
        pytest.param([], False, True, None, id="the registrar came online since the request"),
    ],
)
def test_wait_returns_without_waiting_out_the_timeout(delivered, lost, kicked, expected):
    box = ReplyBox()
    kicks = box.kicks
    for request_id in delivered:
        box.deliver(reply(request_id))
    if kicked:
        box.registrar_status(online=True, retained=False)
    gone = threading.Event()
    if lost:
        gone.set()
    got = box.wait("request1", 60.0, lost=gone, kicks_before=kicks)
    assert (got.request_id if got else None) == expected


def test_older_answers_are_dropped_after_a_wait():
    box = ReplyBox()
    box.deliver(reply("request0"))
    box.deliver(reply("request1"))
    assert box.wait("request1", 60.0, lost=threading.Event()).request_id == "request1"
    assert box.wait("request0", 0.01, lost=threading.Event()) is None


def test_no_answer_is_none_after_the_timeout():
    assert ReplyBox().wait("request1", 0.01, lost=threading.Event()) is None


@pytest.mark.parametrize(
    ("statuses", "online", "kicks"),
    [
        pytest.param([(True, True)], True, 0, id="retained online: learnt on subscribing, no kick"),
        pytest.param([(True, False)], True, 1, id="came online live: a kick"),
        pytest.param([(True, False), (True, False)], True, 1, id="online again: no second kick"),
        pytest.param([(True, False), (False, False), (True, False)], True, 2, id="restarted: a second kick"),
        pytest.param([(False, False)], False, 0, id="offline"),
    ],
)
def test_registrar_status(statuses, online, kicks):
    box = ReplyBox()
    for is_online, retained in statuses:
        box.registrar_status(online=is_online, retained=retained)
    assert (box.online, box.kicks) == (online, kicks)


def test_forget_registrar_makes_it_unknown():
    box = ReplyBox()
    box.registrar_status(online=True, retained=True)
    box.forget_registrar()
    assert not box.online


@pytest.mark.parametrize("wake", ["lost", "reply", "kick"])
def test_a_waiting_registration_wakes_at_once(wake):
    """stop() and a lost connection set `lost`, then wake the box; a reply or a registrar restart wakes it too."""
    box, lost = ReplyBox(), threading.Event()
    kicks = box.kicks  # as a registration reads it before sending: a kick before the wait begins still counts
    got: list[RegisterReply | None] = []
    waiter = threading.Thread(
        target=lambda: got.append(box.wait("request1", 60.0, lost=lost, kicks_before=kicks)), daemon=True
    )
    waiter.start()
    if wake == "lost":
        lost.set()
        box.wake()
    elif wake == "reply":
        box.deliver(reply("request1"))
    else:
        box.registrar_status(online=True, retained=False)
    waiter.join(timeout=10)
    assert not waiter.is_alive(), f"still waiting after {wake}"
    assert [r.request_id if r else None for r in got] == (["request1"] if wake == "reply" else [None])
