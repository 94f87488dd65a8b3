"""A netlink socket that sends one request and collects its reply: acknowledgement, answer or dump.

The kernel's errors come back as OSError with the kernel's errno (ENODEV, EEXIST, ...). Messages are built and
parsed by wgctl.nlmsg. A socket belongs to the network namespace the process was in when it was opened, so
callers open one per operation (cheap: one system call) rather than keep one across namespace changes.
"""

from __future__ import annotations

import errno
import os
import socket
from types import TracebackType

from wgctl import nlmsg

NETLINK_ROUTE = 0
NETLINK_GENERIC = 16
_RECV_BUFFER = 1 << 16  # the kernel fills at most 32 KiB per datagram of a dump
_TIMEOUT_S = 5.0


class NetlinkSocket:
    """One AF_NETLINK socket of `protocol`; a context manager that closes it."""

    def __init__(self, protocol: int = NETLINK_ROUTE, *, body_size: int | None = None) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            self._sock.settimeout(_TIMEOUT_S)
            self._sock.bind((0, 0))
        except OSError:
            self._sock.close()
            raise
        self._body_size = body_size
        self._seq = 0

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def request(self, msg_type: int, body: bytes, attrs: bytes = b"", *, flags: int = 0) -> list[nlmsg.Message]:
        """Send one request and return its reply messages (without the acknowledgement or NLMSG_DONE).

        NLM_F_REQUEST and NLM_F_ACK are always set, so every request ends with a message of its own: a dump
        (NLM_F_DUMP in `flags`) with NLMSG_DONE, anything else with the acknowledgement (after the answer, for
        a GET). OSError with the kernel's errno if it refused.
        """
        self._seq += 1
        seq = self._seq
        self._sock.send(nlmsg.encode(msg_type, flags | nlmsg.NLM_F_REQUEST | nlmsg.NLM_F_ACK, seq, body, attrs))
        replies: list[nlmsg.Message] = []
        while True:
            try:
                data = self._sock.recv(_RECV_BUFFER)
            except TimeoutError as exc:
                raise OSError(errno.ETIMEDOUT, f"no netlink reply within {_TIMEOUT_S:g} s") from exc
            try:
                messages = nlmsg.parse(data, body_size=self._body_size)
            except ValueError as exc:
                raise OSError(errno.EPROTO, f"unreadable netlink reply: {exc}") from exc
            for msg in messages:
                if msg.seq != seq:
                    continue  # not ours (a notification, or a late reply to an earlier request)
                if msg.type in (nlmsg.NLMSG_ERROR, nlmsg.NLMSG_DONE):
                    # Both carry an errno: 0 for an acknowledgement or a complete dump.
                    code = nlmsg.error_code(msg)
                    if code:
                        raise OSError(code, os.strerror(code))
                    return replies
                replies.append(msg)


def genl_family_exists(name: str) -> bool:
    """True if the kernel has the generic netlink family `name` (e.g. "wireguard": the module is loaded)."""
    try:
        with NetlinkSocket(NETLINK_GENERIC, body_size=nlmsg.GENL_BODY_SIZE) as sock:
            sock.request(
                nlmsg.GENL_ID_CTRL,
                nlmsg.genlmsg(nlmsg.CTRL_CMD_GETFAMILY),
                nlmsg.attr(nlmsg.CTRL_ATTR_FAMILY_NAME, nlmsg.text(name)),
            )
    except OSError:
        return False  # ENOENT: no such family; any other error: cannot tell, so not usable either
    return True
