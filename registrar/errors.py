"""Errors of the registrar. One base class; the daemon loop catches RegistrarError and its subclasses."""

from __future__ import annotations

from meshcontract.messages import ErrorCode


class RegistrarError(Exception):
    """Base for everything the registrar raises on purpose."""


class Refused(RegistrarError):
    """A request was refused for a reason the requester is told about (a RegisterReply error)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PoolExhausted(RegistrarError):
    """The mesh network has no free host address left (quarantined ones are not free)."""


class StoreError(RegistrarError):
    """The state store could not read or durably write; the command that needed it did not happen."""


class CredentialsError(RegistrarError):
    """Broker credentials could not be written or the broker could not be told to reload them."""
