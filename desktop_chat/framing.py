"""The chat wire format. Pure: no I/O here, only bytes in and bytes out.

A frame is a 4-byte big-endian body length followed by a UTF-8 JSON object (the body). Three kinds of body:

- message  {"v": 1, "id": ID, "from_name": NAME, "sent_at": UNIX_TIME, "text": TEXT}   sender -> receiver
- ack      {"v": 1, "ack": ID}                                                          receiver -> sender
- refusal  {"v": 1, "refused": REASON}                                                  receiver -> sender

The sender opens a TCP connection to the receiver's mesh IP, writes one message frame and waits for the ack
with the same id; only then is the message "delivered". A receiver that will not take the message (the
source address is not a mesh member) writes a refusal and closes. Every size is bounded so a hostile peer
cannot make us allocate without limit; decode errors carry a stable `reason`: truncated, oversized,
malformed, version, invalid.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

from desktop_chat.errors import FrameError

FRAME_VERSION = 1
HEADER = struct.Struct(">I")
MAX_BODY = 64 * 1024
MAX_TEXT = 4096  # characters; at worst 6 bytes each once JSON-escaped, still well under MAX_BODY
MAX_NAME = 63
MAX_REASON = 200
_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat message as carried on the wire. `from_name` is display only; the address is the identity."""

    id: str
    from_name: str
    sent_at: float
    text: str


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver has stored message `id`."""

    id: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """The receiver will not take messages on this connection, and says why."""

    reason: str


Frame = ChatMessage | Ack | Refusal


def _check_message(msg: ChatMessage) -> None:
    if not isinstance(msg.id, str) or not _ID.match(msg.id):
        raise FrameError("invalid", "id must be 8-64 characters of [A-Za-z0-9_-]")
    if not isinstance(msg.from_name, str) or not 1 <= len(msg.from_name) <= MAX_NAME:
        raise FrameError("invalid", f"from_name must be 1-{MAX_NAME} characters")
    if _CONTROL.search(msg.from_name):
        raise FrameError("invalid", "from_name contains control characters")
    # bool is an int subclass: refuse it explicitly so `true` is not a timestamp.
    if isinstance(msg.sent_at, bool) or not isinstance(msg.sent_at, int | float) or msg.sent_at < 0:
        raise FrameError("invalid", "sent_at must be a non-negative number")
    if not isinstance(msg.text, str) or not 1 <= len(msg.text) <= MAX_TEXT:
        raise FrameError("invalid", f"text must be 1-{MAX_TEXT} characters")


def _frame(body: dict) -> bytes:
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    if len(raw) > MAX_BODY:
        raise FrameError("oversized", f"body of {len(raw)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(len(raw)) + raw


def encode_message(msg: ChatMessage) -> bytes:
    """The frame for `msg`; FrameError("invalid") if a field is out of bounds."""
    _check_message(msg)
    return _frame({"v": FRAME_VERSION, "id": msg.id, "from_name": msg.from_name,
                   "sent_at": float(msg.sent_at), "text": msg.text})


def encode_ack(msg_id: str) -> bytes:
    """The frame acknowledging message `msg_id`."""
    if not _ID.match(msg_id):
        raise FrameError("invalid", "ack id must be 8-64 characters of [A-Za-z0-9_-]")
    return _frame({"v": FRAME_VERSION, "ack": msg_id})


def encode_refusal(reason: str) -> bytes:
    """The frame telling a sender why its connection is refused (truncated to MAX_REASON characters)."""
    return _frame({"v": FRAME_VERSION, "refused": _CONTROL.sub(" ", reason)[:MAX_REASON] or "refused"})


def body_length(header: bytes, *, max_body: int = MAX_BODY) -> int:
    """The body length announced by a 4-byte frame header; FrameError if short, empty or over `max_body`."""
    if len(header) < HEADER.size:
        raise FrameError("truncated", f"header has {len(header)} of {HEADER.size} bytes")
    (length,) = HEADER.unpack(header[: HEADER.size])
    if length > max_body:
        raise FrameError("oversized", f"announced body of {length} bytes exceeds {max_body}")
    if length == 0:
        raise FrameError("malformed", "empty body")
    return length


def decode_body(body: bytes) -> Frame:
    """Decode one frame body into a ChatMessage, Ack or Refusal; FrameError with the reason otherwise."""
    if len(body) > MAX_BODY:
        raise FrameError("oversized", f"body of {len(body)} bytes exceeds {MAX_BODY}")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also an over-long integer
        raise FrameError("malformed", f"not UTF-8 JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FrameError("malformed", "body is not a JSON object")
    # Check the version before the shape: a future version may legitimately have other fields.
    version = data.get("v")
    if version != FRAME_VERSION or isinstance(version, bool):
        raise FrameError("version", f"unsupported frame version {version!r}, expected {FRAME_VERSION}")
    keys = set(data) - {"v"}
    if keys == {"ack"}:
        if not isinstance(data["ack"], str) or not _ID.match(data["ack"]):
            raise FrameError("invalid", "ack id must be 8-64 characters of [A-Za-z0-9_-]")
        return Ack(data["ack"])
    if keys == {"refused"}:
        if not isinstance(data["refused"], str) or len(data["refused"]) > MAX_REASON:
            raise FrameError("invalid", f"refusal reason must be a string of at most {MAX_REASON} characters")
        return Refusal(data["refused"])
    if keys == {"id", "from_name", "sent_at", "text"}:
        msg = ChatMessage(data["id"], data["from_name"], data["sent_at"], data["text"])
        _check_message(msg)
        return msg
    raise FrameError("malformed", f"unknown frame fields {sorted(keys)}")


def decode_frame(data: bytes, *, max_body: int = MAX_BODY) -> tuple[Frame, bytes]:
    """Decode the first complete frame in `data`; return it and the bytes after it.

    FrameError("truncated") if `data` does not hold a whole frame yet.
    """
    length = body_length(data, max_body=max_body)
    end = HEADER.size + length
    if len(data) < end:
        raise FrameError("truncated", f"body has {len(data) - HEADER.size} of {length} bytes")
    return decode_body(data[HEADER.size:end]), data[end:]
