"""Errors of the WireGuard control layer. One base class; callers at a boundary catch WireGuardError.

`temporary` tells a daemon loop whether retrying with backoff can help (a daemon that is still starting,
a socket that refused a connection) or whether the request itself is wrong (a malformed key).
"""

from __future__ import annotations


class WireGuardError(Exception):
    """Base for everything wgctl raises. `temporary` is True when a retry may succeed."""

    temporary: bool = False


class InvalidKeyError(WireGuardError):
    """A key is not 32 bytes of base64 (or hex, on the UAPI wire)."""


class InvalidConfigError(WireGuardError):
    """A peer or interface setting cannot be applied: a bad CIDR, a hostname endpoint, a port out of range."""


class ResolveError(InvalidConfigError):
    """An endpoint's host name could not be resolved to an address (possibly only for now)."""

    temporary = True


class KeyFileError(WireGuardError):
    """The private key file could not be created, read or parsed."""


class InterfaceNotFoundError(WireGuardError):
    """The named interface does not exist (or its userspace daemon is gone)."""


class BackendUnavailableError(WireGuardError):
    """The requested backend cannot run here: no kernel module, no wireguard-go binary, not permitted."""


class UapiError(WireGuardError):
    """wireguard-go answered a UAPI request with a non-zero errno, or the conversation broke off."""

    temporary = True

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class UapiProtocolError(WireGuardError):
    """A UAPI response could not be parsed: an unknown shape, a bad number, a key of the wrong length."""


class NetlinkError(WireGuardError):
    """A netlink request (kernel WireGuard, addresses, links, routes) failed; wraps the pyroute2 error."""

    temporary = True

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
