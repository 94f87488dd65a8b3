"""wgctl.nlmsg against pyroute2's own encoder and decoder: our requests decode there, its messages parse here."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg as pr_ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg as pr_ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg as pr_rtmsg

from wgctl import nlmsg


def pyroute2_bytes(msg, msg_type: int, seq: int, msg_flags: int = 0, **fields) -> bytes:
    for key, value in fields.items():
        msg[key] = value
    msg["header"]["type"], msg["header"]["sequence_number"], msg["header"]["flags"] = msg_type, seq, msg_flags
    msg.encode()
    return bytes(msg.data)


def pyroute2_decoded(cls, data: bytes):
    msg = cls(data)
    msg.decode()
    return msg


@pytest.mark.parametrize(
    ("family", "address", "prefix"),
    [(socket.AF_INET, "100.96.0.5", 16), (socket.AF_INET6, "fd00:9::1", 64)],
)
def test_address_request_decodes_in_pyroute2(family, address, prefix):
    packed = socket.inet_pton(family, address)
    data = nlmsg.encode(
        nlmsg.RTM_NEWADDR,
        nlmsg.NLM_F_REQUEST | nlmsg.NLM_F_CREATE,
        7,
        nlmsg.ifaddrmsg(family, prefixlen=prefix, index=3),
        nlmsg.attr(nlmsg.IFA_LOCAL, packed) + nlmsg.attr(nlmsg.IFA_ADDRESS, packed),
    )
    msg = pyroute2_decoded(pr_ifaddrmsg, data)
    assert (msg["family"], msg["prefixlen"], msg["index"]) == (family, prefix, 3)
    assert (msg["header"]["type"], msg["header"]["sequence_number"]) == (nlmsg.RTM_NEWADDR, 7)
    assert msg["header"]["length"] == len(data)
    assert msg.get_attr("IFA_LOCAL") == address and msg.get_attr("IFA_ADDRESS") == address


def test_route_request_decodes_in_pyroute2():
    data = nlmsg.encode(
        nlmsg.RTM_NEWROUTE,
        nlmsg.NLM_F_REQUEST | nlmsg.NLM_F_CREATE | nlmsg.NLM_F_REPLACE,
        1,
        nlmsg.rtmsg(socket.AF_INET, dst_len=16, table=254, unicast=True),
        nlmsg.attr(nlmsg.RTA_DST, socket.inet_aton("10.88.0.0")) + nlmsg.attr(nlmsg.RTA_OIF, nlmsg.u32(4)),
    )
    msg = pyroute2_decoded(pr_rtmsg, data)
    assert (msg["family"], msg["dst_len"], msg["table"]) == (socket.AF_INET, 16, 254)
    assert (msg["proto"], msg["scope"], msg["type"]) == (nlmsg.RTPROT_STATIC, 0, nlmsg.RTN_UNICAST)
    assert msg.get_attr("RTA_DST") == "10.88.0.0" and msg.get_attr("RTA_OIF") == 4


def test_link_request_decodes_in_pyroute2():
    data = nlmsg.encode(
        nlmsg.RTM_NEWLINK,
        nlmsg.NLM_F_REQUEST,
        2,
        nlmsg.ifinfomsg(5, flags=nlmsg.IFF_UP, change=nlmsg.IFF_UP),
        nlmsg.attr(nlmsg.IFLA_MTU, nlmsg.u32(1420)) + nlmsg.attr(nlmsg.IFLA_IFNAME, nlmsg.text("mv-ab-1")),
    )
    msg = pyroute2_decoded(pr_ifinfmsg, data)
    assert (msg["index"], msg["flags"], msg["change"]) == (5, nlmsg.IFF_UP, nlmsg.IFF_UP)
    assert msg.get_attr("IFLA_MTU") == 1420 and msg.get_attr("IFLA_IFNAME") == "mv-ab-1"


def test_pyroute2_messages_parse_here():
    link = pyroute2_bytes(pr_ifinfmsg(), nlmsg.RTM_NEWLINK, 9, nlmsg.NLM_F_MULTI, index=6, flags=0x1003,
                          attrs=[("IFLA_IFNAME", "eth0"), ("IFLA_MTU", 1500)])
    addr = pyroute2_bytes(pr_ifaddrmsg(), nlmsg.RTM_NEWADDR, 9, nlmsg.NLM_F_MULTI, family=socket.AF_INET6,
                          prefixlen=64, index=6, attrs=[("IFA_ADDRESS", "fd00::7")])
    route = pyroute2_bytes(pr_rtmsg(), nlmsg.RTM_NEWROUTE, 9, nlmsg.NLM_F_MULTI, family=socket.AF_INET,
                           dst_len=16, table=252, attrs=[("RTA_TABLE", 1000), ("RTA_DST", "10.1.0.0")])
    done = struct.pack("=IHHIIi", 20, nlmsg.NLMSG_DONE, nlmsg.NLM_F_MULTI, 9, 0, 0)
    got = nlmsg.parse(link + addr + route + done)
    assert [m.type for m in got] == [nlmsg.RTM_NEWLINK, nlmsg.RTM_NEWADDR, nlmsg.RTM_NEWROUTE, nlmsg.NLMSG_DONE]
    assert all(m.seq == 9 for m in got)
    assert nlmsg.link_info(got[0]) == (6, 0x1003)
    assert nlmsg.get_text(got[0].attrs[nlmsg.IFLA_IFNAME]) == "eth0"
    assert nlmsg.get_u32(got[0].attrs[nlmsg.IFLA_MTU]) == 1500
    assert nlmsg.addr_info(got[1]) == (socket.AF_INET6, 64, 6)
    assert nlmsg.get_ip(socket.AF_INET6, got[1].attrs[nlmsg.IFA_ADDRESS]) == "fd00::7"
    assert nlmsg.route_info(got[2]) == (socket.AF_INET, 16, 1000)  # RTA_TABLE wins over the byte


@pytest.mark.parametrize(("code", "expected"), [(0, 0), (-errno.ENODEV, errno.ENODEV), (-errno.EEXIST, errno.EEXIST)])
def test_error_code(code, expected):
    request = struct.pack("=IHHII", 16, nlmsg.RTM_GETLINK, 1, 3, 0)
    data = struct.pack("=IHHII", 16 + 4 + len(request), nlmsg.NLMSG_ERROR, 0, 3, 0) + struct.pack("=i", code)
    (msg,) = nlmsg.parse(data + request)
    assert msg.type == nlmsg.NLMSG_ERROR and msg.attrs == {}
    assert nlmsg.error_code(msg) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(b"", 0), (struct.pack("=i", 0), 0), (struct.pack("=i", -errno.EINTR), errno.EINTR)],
    ids=["old-kernel-empty", "complete", "dump-failed"],
)
def test_done_carries_an_errno(payload, expected):
    data = struct.pack("=IHHII", 16 + len(payload), nlmsg.NLMSG_DONE, nlmsg.NLM_F_MULTI, 5, 0) + payload
    (msg,) = nlmsg.parse(data)
    assert msg.type == nlmsg.NLMSG_DONE and nlmsg.error_code(msg) == expected


def test_generic_replies_take_the_given_body_size():
    # A generic netlink reply's type is the family id: 0x10 for the controller, which is RTM_NEWLINK's number.
    body = nlmsg.genlmsg(1, 2)
    data = nlmsg.encode(nlmsg.GENL_ID_CTRL, 0, 4, body, nlmsg.attr(nlmsg.CTRL_ATTR_FAMILY_ID, struct.pack("=H", 21)))
    (msg,) = nlmsg.parse(data, body_size=nlmsg.GENL_BODY_SIZE)
    assert msg.body == body
    assert msg.attrs == {nlmsg.CTRL_ATTR_FAMILY_ID: struct.pack("=H", 21)}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"", {}, id="empty"),
        pytest.param(nlmsg.attr(3, b"ab\0"), {3: b"ab\0"}, id="padded"),
        pytest.param(nlmsg.attr(3, b"x") + nlmsg.attr(3, b"y"), {3: b"x"}, id="first-wins"),
        pytest.param(nlmsg.attr(0x8000 | 4, b"n"), {4: b"n"}, id="flag-bits-masked"),
        pytest.param(struct.pack("=HH", 40, 1) + b"xxxx", {}, id="length-past-end"),
        pytest.param(struct.pack("=HH", 2, 1) + b"xxxx", {}, id="length-below-header"),
    ],
)
def test_parse_attrs(raw, expected):
    assert nlmsg.parse_attrs(raw) == expected


def test_truncated_message_is_an_error():
    data = nlmsg.encode(nlmsg.RTM_NEWLINK, 0, 1, nlmsg.ifinfomsg(1))
    with pytest.raises(ValueError, match="truncated"):
        nlmsg.parse(data[:-4])


def test_body_shorter_than_its_fixed_header_is_an_error():
    data = nlmsg.encode(nlmsg.RTM_NEWROUTE, 0, 1, b"\0" * 8)  # an rtmsg is 12 bytes
    with pytest.raises(ValueError, match="too short"):
        nlmsg.parse(data)
