"""Errors of the shared contract. One base class; callers at a boundary catch ContractError."""


class ContractError(Exception):
    """Base for everything the contract package raises."""


class TopicError(ContractError):
    """A topic string is not part of the contract (unknown kind, bad id, wrong shape)."""


class PayloadError(ContractError):
    """A payload could not be decoded into its message model; the message says why."""
