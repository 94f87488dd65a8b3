"""Errors of the chat. One base class; the CLI and the window catch ChatError at their boundary."""

from __future__ import annotations


class ChatError(Exception):
    """Base for everything desktop_chat raises."""


class FrameError(ChatError):
    """Bytes from the wire are not a valid chat frame. `reason` is a short stable word for logs and tests."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeliveryError(ChatError):
    """A message was not delivered and acknowledged. `reason` says why in a few words (shown to the user)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ListenError(ChatError):
    """The chat server could not bind its address (not configured on this host yet, or in use)."""


class PeerSourceError(ChatError):
    """The peer list (the local node agent) could not be read."""


class HistoryError(ChatError):
    """The local message history could not be read or written."""
