"""Errors of the broker package. One base class; callers at a boundary catch BrokerError."""


class BrokerError(Exception):
    """Base for everything the broker package raises."""


class BrokerStartError(BrokerError):
    """The embedded broker could not start (port in use, bad settings); the message says why."""


class PasswordFileError(BrokerError):
    """The password file could not be read or written."""
