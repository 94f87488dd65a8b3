"""The writer's inbox (registrar.inbox): when the writer wakes, and that lingering commands keep their place."""

from __future__ import annotations

import threading
import time

import pytest

from registrar.inbox import Inbox, next_wake, wakes

NOW = 100.0


@pytest.mark.parametrize(
    ("why", "urgent", "lingering_since", "deadline", "expected"),
    [
        ("nothing queued, no deadline", False, None, None, False),
        ("something urgent", True, None, None, True),
        ("urgent behind lingering ones", True, NOW - 0.01, None, True),
        ("lingering, not long enough", False, NOW - 0.01, None, False),
        ("lingering exactly the linger", False, NOW - 0.05, None, True),
        ("lingering longer", False, NOW - 1.0, None, True),
        ("deadline not yet", False, None, NOW + 0.01, False),
        ("deadline came", False, None, NOW, True),
        ("deadline came while lingering", False, NOW - 0.01, NOW - 0.001, True),
    ],
)
def test_wakes(why, urgent, lingering_since, deadline, expected):
    assert wakes(urgent=urgent, lingering_since=lingering_since, now=NOW, linger_s=0.05, deadline=deadline) is expected


@pytest.mark.parametrize(
    ("why", "lingering_since", "deadline", "expected"),
    [
        ("nothing to wait for", None, None, None),
        ("only a deadline", None, NOW + 1, NOW + 1),
        ("only a linger", NOW, None, NOW + 0.05),
        ("the linger ends first", NOW, NOW + 1, NOW + 0.05),
        ("the deadline comes first", NOW, NOW + 0.01, NOW + 0.01),
    ],
)
def test_next_wake(why, lingering_since, deadline, expected):
    assert next_wake(lingering_since=lingering_since, linger_s=0.05, deadline=deadline) == expected


def test_commands_come_out_in_the_order_they_were_put_lingering_or_not():
    inbox = Inbox(linger_s=60)
    inbox.put_lingering("heartbeat n1")
    inbox.put_lingering("heartbeat n2")
    inbox.put("offline n1")
    inbox.put_lingering("heartbeat n1 again")
    assert inbox.take(deadline=None) == ["heartbeat n1", "heartbeat n2", "offline n1", "heartbeat n1 again"]
    assert inbox.empty()


def test_an_urgent_command_ends_the_linger_of_those_before_it():
    inbox = Inbox(linger_s=60)
    inbox.put_lingering("heartbeat")
    taken: list[list[object]] = []
    reader = threading.Thread(target=lambda: taken.append(inbox.take(deadline=None)), daemon=True)
    reader.start()
    inbox.put("registration")
    reader.join(10)
    assert taken == [["heartbeat", "registration"]]


def test_lingering_commands_alone_are_taken_once_the_oldest_has_lingered():
    inbox = Inbox(linger_s=0.05)
    taken: list[list[object]] = []
    reader = threading.Thread(target=lambda: taken.append(inbox.take(deadline=None)), daemon=True)
    reader.start()  # asleep without a deadline: the first lingering command must tell it when to look
    put_at = time.monotonic()
    inbox.put_lingering("heartbeat")
    reader.join(10)
    assert taken == [["heartbeat"]]
    assert time.monotonic() - put_at >= 0.05


def test_lingering_commands_do_not_end_the_readers_wait_early():
    inbox = Inbox(linger_s=60)
    inbox.put_lingering("heartbeat")
    deadline = time.monotonic() + 0.05
    assert inbox.take(deadline=deadline) == ["heartbeat"]  # taken when the writer's own deadline came
    assert time.monotonic() >= deadline
    assert inbox.empty() and inbox.take(deadline=time.monotonic()) == []
