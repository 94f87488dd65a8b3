"""The chat wire format: table-driven good frames and every decode error reason."""

from __future__ import annotations

import json
import struct

import pytest

from desktop_chat.errors import FrameError
from desktop_chat.framing import (
    MAX_BODY,
    MAX_TEXT,
    Ack,
    ChatMessage,
    Refusal,
    body_length,
    decode_body,
    decode_frame,
    encode_ack,
    encode_message,
    encode_refusal,
)

MID = "0123456789abcdef"


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def js(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "frame",
    [
        ChatMessage(MID, "alice", 1700000000.5, "hello"),
        ChatMessage(MID, "Zoë ✓", 0.0, "multi\nline \u2603 text"),
        ChatMessage("a" * 64, "n" * 63, 1.0, "x" * MAX_TEXT),
        ChatMessage(MID, "bob", 12, "integer timestamp"),
    ],
)
def test_message_round_trip(frame):
    decoded, rest = decode_frame(encode_message(frame))
    assert rest == b""
    assert decoded == ChatMessage(frame.id, frame.from_name, float(frame.sent_at), frame.text)


def test_ack_and_refusal_round_trip():
    data = encode_ack(MID) + encode_refusal("10.0.0.9 is not a current mesh member")
    first, rest = decode_frame(data)
    second, rest = decode_frame(rest)
    assert (first, second, rest) == (Ack(MID), Refusal("10.0.0.9 is not a current mesh member"), b"")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\x00\x00", "truncated"),
        (framed(js({"v": 1, "ack": MID}))[:-3], "truncated"),
        (struct.pack(">I", MAX_BODY + 1), "oversized"),
        (struct.pack(">I", 0xFFFFFFFF) + b"{}", "oversized"),
        (struct.pack(">I", 0), "malformed"),
        (framed(b"{not json"), "malformed"),
        (framed(b'{"v": 1, "ack": ' + b"9" * 5000 + b"}"), "malformed"),  # past Python's integer digit limit
        (framed(b"\xff\xfe\x00"), "malformed"),
        (framed(js([1, 2, 3])), "malformed"),
        (framed(js({"v": 1, "what": "ever"})), "malformed"),
        (framed(js({"v": 1, "id": MID, "text": "no name or time"})), "malformed"),
        (framed(js({"v": 2, "ack": MID})), "version"),
        (framed(js({"ack": MID})), "version"),
        (framed(js({"v": "1", "ack": MID})), "version"),
        (framed(js({"v": True, "ack": MID})), "version"),
        (framed(js({"v": 1, "ack": "short"})), "invalid"),
        (framed(js({"v": 1, "ack": 12345678})), "invalid"),
        (framed(js({"v": 1, "refused": 7})), "invalid"),
        (framed(js({"v": 1, "id": MID, "from_name": "a", "sent_at": 1.0, "text": ""})), "invalid"),
        (framed(js({"v": 1, "id": MID, "from_name": "a", "sent_at": 1.0, "text": "x" * (MAX_TEXT + 1)})), "invalid"),
        (framed(js({"v": 1, "id": MID, "from_name": "", "sent_at": 1.0, "text": "hi"})), "invalid"),
        (framed(js({"v": 1, "id": MID, "from_name": "a\nb", "sent_at": 1.0, "text": "hi"})), "invalid"),
        (framed(js({"v": 1, "id": MID, "from_name": "a", "sent_at": -1, "text": "hi"})), "invalid"),
        (framed(js({"v": 1, "id": MID, "from_name": "a", "sent_at": True, "text": "hi"})), "invalid"),
        (framed(js({"v": 1, "id": MID, "from_name": "a", "sent_at": "now", "text": "hi"})), "invalid"),
        (framed(js({"v": 1, "id": "bad id!!", "from_name": "a", "sent_at": 1.0, "text": "hi"})), "invalid"),
    ],
)
def test_decode_errors(data, reason):
    with pytest.raises(FrameError) as err:
        decode_frame(data)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "message",
    [
        ChatMessage("short", "a", 1.0, "hi"),
        ChatMessage(MID, "a" * 64, 1.0, "hi"),
        ChatMessage(MID, "a", 1.0, ""),
        ChatMessage(MID, "a", 1.0, "x" * (MAX_TEXT + 1)),
    ],
)
def test_encode_refuses_out_of_bounds(message):
    with pytest.raises(FrameError) as err:
        encode_message(message)
    assert err.value.reason == "invalid"


def test_body_length_respects_a_smaller_limit():
    assert body_length(struct.pack(">I", 100)) == 100
    with pytest.raises(FrameError) as err:
        body_length(struct.pack(">I", 100), max_body=99)
    assert err.value.reason == "oversized"


def test_decode_body_rejects_an_oversized_body_directly():
    with pytest.raises(FrameError) as err:
        decode_body(b" " * (MAX_BODY + 1))
    assert err.value.reason == "oversized"


def test_refusal_reason_is_cleaned_and_bounded():
    frame, _ = decode_frame(encode_refusal("bad\nthing" + "x" * 500))
    assert isinstance(frame, Refusal)
    assert "\n" not in frame.reason and len(frame.reason) == 200
