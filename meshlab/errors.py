"""Errors of the lab. One base class; the CLI catches LabError and prints its message."""


class LabError(Exception):
    """Base for everything meshlab raises."""


class LabStateError(LabError):
    """The lab directory holds no lab, a different lab, or a state file that cannot be read."""


class CommandError(LabError):
    """A system command (ip, nft, a service CLI) failed; the message names the command and its output."""


class NotReadyError(LabError):
    """A condition was not reached before its deadline (a service did not start, the mesh did not converge)."""
