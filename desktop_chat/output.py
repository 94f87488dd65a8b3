"""What meshchat's headless commands print: lines for people, or one JSON object per event for programs.

No I/O here: each function returns the line; the CLI prints it.

`meshchat listen --json` prints these objects on stdout, one per line, flushed at once (the lab reads them):

    {"event": "waiting", "detail": TEXT}              not listening yet (no mesh IP from the agent, bind failed)
    {"event": "listening", "ip": IP, "port": N}       bound; messages can arrive from now on
    {"event": "message", "from_ip": IP, "name": NAME, "text": TEXT, "msg_id": ID, "sent_at": UNIX_TIME}

Programs must ignore keys and events they do not know: later versions may add some.
"""

from __future__ import annotations

import json

from desktop_chat.history import Record


def _event(kind: str, **fields: object) -> str:
    return json.dumps({"event": kind, **fields})


def _escape(text: str) -> str:
    # One message per output line, whatever it contains.
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def message_line(record: Record) -> str:
    """A received message for people: `FROM_IP NAME: TEXT`, newlines in the text escaped."""
    return f"{record.peer_ip} {record.name}: {_escape(record.text)}"


def message_event(record: Record) -> str:
    """A received message for programs."""
    return _event("message", from_ip=record.peer_ip, name=record.name, text=record.text, msg_id=record.msg_id,
                  sent_at=record.sent_at)


def listening_line(ip: str, port: int) -> str:
    """The listener is bound, for people (stderr)."""
    return f"meshchat: listening on {ip}:{port}"


def listening_event(ip: str, port: int) -> str:
    """The listener is bound, for programs."""
    return _event("listening", ip=ip, port=port)


def waiting_line(detail: str) -> str:
    """Not listening yet, and why, for people (stderr)."""
    return f"meshchat: {detail}"


def waiting_event(detail: str) -> str:
    """Not listening yet, and why, for programs."""
    return _event("waiting", detail=detail)


def delivered_line(peer_ip: str, name: str | None, elapsed_s: float) -> str:
    """`meshchat send` succeeded: `delivered to NAME (IP) in N ms`, or `delivered to IP in N ms` without a name."""
    to = f"{name} ({peer_ip})" if name and name != peer_ip else peer_ip
    return f"delivered to {to} in {elapsed_s * 1000:.0f} ms"
