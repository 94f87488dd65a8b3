"""Netlink messages as bytes: encoding the few rtnetlink and generic netlink requests wgctl sends, parsing replies.

No I/O here (wgctl.netlink sends and receives). Only what the agent needs is covered: links (by name, dump,
set up/MTU, delete), addresses (dump, add), routes (dump, add/replace) and a generic netlink family lookup.
The layouts are the kernel's (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/genetlink.h), in
host byte order, with every header and attribute padded to 4 bytes.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

# netlink.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
# rtnetlink.h
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
IFLA_IFNAME, IFLA_MTU = 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RTN_UNICAST = 1
RTPROT_STATIC = 4  # what `ip route add` without `proto` and pyroute2 both use for an administrator's route
RT_SCOPE_UNIVERSE = 0
IFF_UP = 0x1
# genetlink.h
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_ATTR = struct.Struct("=HH")  # rtattr / nlattr: length, type
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst len, src len, tos, table, protocol, scope, type, flags
_GENL = struct.Struct("=BBH")  # genlmsghdr: command, version, reserved
_ERRNO = struct.Struct("=i")
_NLA_TYPE_MASK = 0x3FFF  # the top two bits of an attribute type are flags (nested, byte order)


def _pad(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True, slots=True)
class Message:
    """One netlink message: its header fields, the fixed body after the header and the attributes after that."""

    type: int
    flags: int
    seq: int
    body: bytes
    attrs: dict[int, bytes] = field(default_factory=dict)


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded."""
    raw = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return raw + bytes(_pad(len(raw)) - len(raw))


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def text(value: str) -> bytes:
    """A NUL-terminated string payload (interface and family names)."""
    return value.encode() + b"\0"


def encode(msg_type: int, flags: int, seq: int, body: bytes, attrs: bytes = b"") -> bytes:
    """A whole request: header, fixed body, attributes."""
    payload = body + bytes(_pad(len(body)) - len(body)) + attrs
    return _HEADER.pack(_HEADER.size + len(payload), msg_type, flags, seq, 0) + payload


def ifinfomsg(index: int = 0, *, flags: int = 0, change: int = 0, family: int = socket.AF_UNSPEC) -> bytes:
    return _IFINFO.pack(family, 0, index, flags, change)


def ifaddrmsg(family: int, *, prefixlen: int = 0, index: int = 0) -> bytes:
    return _IFADDR.pack(family, prefixlen, 0, RT_SCOPE_UNIVERSE, index)


def rtmsg(family: int, *, dst_len: int = 0, table: int = 0, unicast: bool = False) -> bytes:
    """A route message; `unicast` fills in what adding a plain route needs (static, universe scope)."""
    if unicast:
        return _RTMSG.pack(family, dst_len, 0, 0, table, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
    return _RTMSG.pack(family, dst_len, 0, 0, table, 0, 0, 0, 0)


def genlmsg(command: int, version: int = 1) -> bytes:
    return _GENL.pack(command, version, 0)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attribute type -> payload (the first of a repeated type wins); stops at a malformed length."""
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > len(data):
            break
        attrs.setdefault(kind & _NLA_TYPE_MASK, data[offset + _ATTR.size : offset + length])
        offset += _pad(length)
    return attrs


_RTNL_BODY_SIZE = {RTM_NEWLINK: _IFINFO.size, RTM_DELLINK: _IFINFO.size, RTM_NEWADDR: _IFADDR.size,
                   RTM_NEWROUTE: _RTMSG.size}
GENL_BODY_SIZE = _GENL.size


def parse(data: bytes, *, body_size: int | None = None) -> list[Message]:
    """The messages in one datagram; ValueError if one is truncated. The fixed body's size comes from the
    message type for rtnetlink, or is `body_size` for every reply of another family (generic netlink:
    GENL_BODY_SIZE, since its message types are family ids that overlap rtnetlink's)."""
    out = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, flags, seq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise ValueError(f"truncated netlink message ({length} bytes at offset {offset} of {len(data)})")
        payload = data[offset + _HEADER.size : offset + length]
        if msg_type in (NLMSG_ERROR, NLMSG_DONE):
            # An errno (and for an error the request's header), not attributes; a DONE from an old kernel may
            # carry nothing at all.
            out.append(Message(msg_type, flags, seq, payload[: _ERRNO.size]))
        else:
            size = body_size if body_size is not None else _RTNL_BODY_SIZE.get(msg_type, 0)
            if len(payload) < size:
                raise ValueError(f"netlink message of type {msg_type} too short for its header ({len(payload)} bytes)")
            out.append(Message(msg_type, flags, seq, payload[:size], parse_attrs(payload[_pad(size) :])))
        offset += _pad(length)
    return out


def error_code(msg: Message) -> int:
    """The positive errno of an NLMSG_ERROR or NLMSG_DONE message; 0 for an acknowledgement or a whole dump."""
    if len(msg.body) < _ERRNO.size:
        return 0
    (code,) = _ERRNO.unpack(msg.body)
    return -code


def link_info(msg: Message) -> tuple[int, int]:
    """(index, flags) of an RTM_NEWLINK message."""
    _, _, index, flags, _ = _IFINFO.unpack(msg.body)
    return index, flags


def addr_info(msg: Message) -> tuple[int, int, int]:
    """(family, prefix length, interface index) of an RTM_NEWADDR message."""
    family, prefixlen, _, _, index = _IFADDR.unpack(msg.body)
    return family, prefixlen, index


def route_info(msg: Message) -> tuple[int, int, int]:
    """(family, destination prefix length, table) of an RTM_NEWROUTE message; RTA_TABLE wins over the byte."""
    family, dst_len, _, _, table, *_ = _RTMSG.unpack(msg.body)
    if RTA_TABLE in msg.attrs:
        table = get_u32(msg.attrs[RTA_TABLE])
    return family, dst_len, table


def get_u32(payload: bytes) -> int:
    return int(struct.unpack("=I", payload[:4])[0])


def get_text(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


def get_ip(family: int, payload: bytes) -> str:
    """An address attribute as text ("100.96.0.1", "fd00::1")."""
    return socket.inet_ntop(family, payload)
