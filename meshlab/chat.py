"""The chat on a lab's nodes: `meshchat listen --json` started on a node and read back, and `meshchat send`.

Nothing here reads text meant for people: the listener's stdout is one JSON object per event (listening,
message; desktop_chat/output.py documents them) kept in the node's chat.jsonl, its stderr goes to chat.log, and
a send is judged by its exit status. meshchat finds the node's agent through MESHVPN_SOCKET (meshlab.traffic).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meshlab import system
from meshlab.context import LabContext, child_env, tool
from meshlab.state import ProcessRecord
from meshlab.traffic import SOCKET_ENV, Traffic


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message a node's listener received: the source address it saw, the sender's display name, the text."""

    from_ip: str
    name: str
    text: str


def parse_events(text: str) -> list[dict]:
    """The events in a listener's JSON-lines output. No I/O here.

    A last line without its newline is still being written and is left for the next read; a line that is not a
    JSON object with an "event" key is not an event (skipped, whatever printed it).
    """
    events = []
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            events.append(event)
    return events


def received_messages(events: list[dict]) -> list[ReceivedMessage]:
    """The message events, in order. No I/O here."""
    return [ReceivedMessage(str(e.get("from_ip")), str(e.get("name")), str(e.get("text")))
            for e in events if e["event"] == "message"]


class LabChat:
    """meshchat's headless commands on the lab's nodes."""

    def __init__(self, ctx: LabContext, traffic: Traffic) -> None:
        self.ctx = ctx
        self.traffic = traffic

    def _events_file(self, name: str) -> Path:
        return self.ctx.store.node_dir(name) / "chat.jsonl"

    def _events(self, name: str) -> list[dict]:
        try:
            return parse_events(self._events_file(name).read_text(errors="replace"))
        except OSError:
            return []

    def listen(self, name: str, *, count: int) -> ProcessRecord:
        """Start `meshchat listen --json` on node `name` (on its mesh IP, from its agent); exits after `count`."""
        record = self.ctx.node(name)
        events = self._events_file(name)
        events.unlink(missing_ok=True)
        env = child_env()
        env[SOCKET_ENV] = str(self.ctx.store.agent_socket(name))
        return system.spawn([tool("meshchat"), "listen", "--json", "--name", name, "--count", str(count)],
                            namespace=record.namespace, log_path=self.ctx.store.node_dir(name) / "chat.log",
                            stdout_path=events, env=env)

    def listening(self, name: str) -> bool:
        """True once node `name`'s listener reported that it listens."""
        return any(e["event"] == "listening" for e in self._events(name))

    def received(self, name: str) -> list[ReceivedMessage]:
        """The messages node `name`'s listener received so far, in order."""
        return received_messages(self._events(name))

    def send(self, src: str, dst: str, text: str, *, timeout_s: float = 3.0) -> tuple[bool, str]:
        """`meshchat send` from `src` to `dst`'s mesh IP: (delivered, its verdict line).

        The verdict is "delivered to NAME (IP) in N ms" on success, else the reason meshchat gave.
        """
        proc = self.traffic.exec(src, [tool("meshchat"), "send", "--name", src, "--to", self.ctx.mesh_ip(dst),
                                       "--timeout", str(timeout_s), text], timeout=timeout_s + 15)
        # On failure meshchat may log a warning first and then print its verdict: the verdict is the last line.
        lines = ((proc.stdout if proc.returncode == 0 else proc.stderr) or "").strip().splitlines()
        return proc.returncode == 0, (lines[-1] if lines else "")
