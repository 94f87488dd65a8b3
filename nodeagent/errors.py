"""Errors of the node agent. One base class; the CLI catches AgentError and turns it into an exit status."""

from __future__ import annotations


class AgentError(Exception):
    """Base for everything the node agent raises on purpose."""


class SettingsError(AgentError):
    """A setting is missing or cannot be resolved (e.g. no endpoint given and no default route)."""


class StateDirError(AgentError):
    """A file in the state directory cannot be read or written."""


class RegistrationRefused(AgentError):
    """The registrar refused our registration: retrying cannot help (bad/expired/used token, key conflict...).

    `code` is the registrar's ErrorCode string.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"registration refused ({code}): {message}")
        self.code = code
        self.reason = message


class EnrollmentRefused(AgentError):
    """The registrar refused to enroll us (bad, used or expired token; revoked key; CA pin mismatch...).

    `code` is the registrar's ErrorCode string (or "ca_mismatch" when the registrar could not be verified).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"enrollment refused ({code}): {message}")
        self.code = code
        self.reason = message
