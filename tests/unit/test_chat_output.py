"""What meshchat's headless commands print (desktop_chat.output): lines for people, JSON events for programs."""

from __future__ import annotations

import json

import pytest

from desktop_chat import output
from desktop_chat.history import Record


def _record(text: str, *, name: str = "alice") -> Record:
    return Record(peer_ip="100.96.0.1", msg_id="m1", direction="in", name=name, text=text, sent_at=12.5,
                  status="received")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("hello", "100.96.0.1 alice: hello"),
        ("two\nlines", "100.96.0.1 alice: two\\nlines"),
        ("back\\slash\r", "100.96.0.1 alice: back\\\\slash\\r"),
    ],
)
def test_message_line_is_one_line(text, line):
    assert output.message_line(_record(text)) == line


@pytest.mark.parametrize("text", ["hello", "two\nlines", "quote \" and ünïcode"])
def test_message_event_keeps_the_text_exact(text):
    line = output.message_event(_record(text))
    assert "\n" not in line
    assert json.loads(line) == {"event": "message", "from_ip": "100.96.0.1", "name": "alice", "text": text,
                                "msg_id": "m1", "sent_at": 12.5}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (output.listening_event("100.96.0.2", 7800), {"event": "listening", "ip": "100.96.0.2", "port": 7800}),
        (output.waiting_event("no mesh IP yet"), {"event": "waiting", "detail": "no mesh IP yet"}),
    ],
)
def test_status_events(line, expected):
    assert json.loads(line) == expected


@pytest.mark.parametrize(
    ("ip", "name", "elapsed", "line"),
    [
        ("100.96.0.2", "bob", 0.0123, "delivered to bob (100.96.0.2) in 12 ms"),
        ("100.96.0.2", None, 1.5, "delivered to 100.96.0.2 in 1500 ms"),
        ("100.96.0.2", "", 0.0004, "delivered to 100.96.0.2 in 0 ms"),
        ("100.96.0.2", "100.96.0.2", 0.002, "delivered to 100.96.0.2 in 2 ms"),
    ],
)
def test_delivered_line(ip, name, elapsed, line):
    assert output.delivered_line(ip, name, elapsed) == line
