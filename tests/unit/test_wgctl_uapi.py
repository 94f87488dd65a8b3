"""UAPI encoding and parsing against golden texts."""

from __future__ import annotations

import base64

import pytest

from wgctl.errors import InvalidConfigError, InvalidKeyError, UapiError, UapiProtocolError
from wgctl.model import InterfaceState, PeerChanges, PeerConfig, PeerState
from wgctl.uapi import (
    check_set_response,
    encode_set,
    key_from_hex,
    key_to_hex,
    parse_errno,
    parse_get,
)

HEX_A = "11" * 32
HEX_B = "22" * 32
HEX_PRIV = "306ce378fe0f61fd98725fffedced11a63ed468246d2f5980b2412e82f02c665"
A = base64.b64encode(bytes.fromhex(HEX_A)).decode()
B = base64.b64encode(bytes.fromhex(HEX_B)).decode()
PRIV = base64.b64encode(bytes.fromhex(HEX_PRIV)).decode()
PUB = "bQq1uJk8cJq4HnNiToM02vVgEjzEuyz78LxHh0cWtSs="  # wg pubkey of PRIV


def test_key_round_trip():
    assert key_to_hex(A) == HEX_A
    assert key_from_hex(HEX_A) == A


@pytest.mark.parametrize("bad", ["", "zz" * 32, "11" * 31, "11" * 33])
def test_bad_hex_keys(bad):
    with pytest.raises(UapiProtocolError):
        key_from_hex(bad)


@pytest.mark.parametrize(
    ("kwargs", "golden"),
    [
        pytest.param({}, "set=1\n\n", id="nothing"),
        pytest.param(
            {"private_key": PRIV, "listen_port": 51820},
            f"set=1\nprivate_key={HEX_PRIV}\nlisten_port=51820\n\n",
            id="interface",
        ),
        pytest.param(
            {"changes": PeerChanges(remove=(A,))},
            f"set=1\npublic_key={HEX_A}\nremove=true\n\n",
            id="remove",
        ),
        pytest.param(
            {
                "changes": PeerChanges(
                    upsert=(PeerConfig(A, ("100.96.0.2/32", "10.1.2.3/24"), "192.0.2.1:51820", 25),)
                )
            },
            f"set=1\npublic_key={HEX_A}\nendpoint=192.0.2.1:51820\npersistent_keepalive_interval=25\n"
            "replace_allowed_ips=true\nallowed_ip=100.96.0.2/32\nallowed_ip=10.1.2.0/24\n\n",
            id="upsert-full",
        ),
        pytest.param(
            {"changes": PeerChanges(upsert=(PeerConfig(A, ()),))},
            f"set=1\npublic_key={HEX_A}\npersistent_keepalive_interval=0\nreplace_allowed_ips=true\n\n",
            id="upsert-no-endpoint-no-ips",
        ),
        pytest.param(
            {"changes": PeerChanges(upsert=(PeerConfig(A, ("fd00::1/128",), "[2001:DB8::1]:51820"),))},
            f"set=1\npublic_key={HEX_A}\nendpoint=[2001:db8::1]:51820\npersistent_keepalive_interval=0\n"
            "replace_allowed_ips=true\nallowed_ip=fd00::1/128\n\n",
            id="ipv6",
        ),
        pytest.param(
            {
                "changes": PeerChanges(upsert=(PeerConfig(B, ("100.96.0.3/32",)),), remove=(A,)),
                "update_only": True,
            },
            f"set=1\npublic_key={HEX_A}\nremove=true\npublic_key={HEX_B}\nupdate_only=true\n"
            "persistent_keepalive_interval=0\nreplace_allowed_ips=true\nallowed_ip=100.96.0.3/32\n\n",
            id="remove-before-upsert-update-only",
        ),
    ],
)
def test_encode_set(kwargs, golden):
    assert encode_set(**kwargs) == golden


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"private_key": "short"}, InvalidKeyError, id="bad-private-key"),
        pytest.param({"listen_port": 70000}, InvalidConfigError, id="bad-port"),
        pytest.param({"changes": PeerChanges(remove=("x",))}, InvalidKeyError, id="bad-remove"),
        pytest.param(
            {"changes": PeerChanges(upsert=(PeerConfig(A, ("100.96.0.2/32\nremove=true",)),))},
            InvalidConfigError,
            id="newline-injection-in-cidr",
        ),
        pytest.param(
            {"changes": PeerChanges(upsert=(PeerConfig(A, (), "node-a.example:51820"),))},
            InvalidConfigError,
            id="hostname-endpoint",
        ),
        pytest.param(
            {"changes": PeerChanges(upsert=(PeerConfig(A, (), "192.0.2.1:0"),))},
            InvalidConfigError,
            id="port-0",
        ),
        pytest.param(
            {"changes": PeerChanges(upsert=(PeerConfig(A, (), None, -1),))},
            InvalidConfigError,
            id="keepalive",
        ),
    ],
)
def test_encode_set_rejects_before_writing(kwargs, error):
    with pytest.raises(error):
        encode_set(**kwargs)


GET_FULL = (
    f"private_key={HEX_PRIV}\nlisten_port=51999\nfwmark=7\n"
    f"public_key={HEX_A}\npreshared_key={'00' * 32}\nprotocol_version=1\nendpoint=192.0.2.1:51820\n"
    "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\ntx_bytes=1184\nrx_bytes=92\n"
    "persistent_keepalive_interval=25\nallowed_ip=100.96.0.2/32\nallowed_ip=10.1.0.0/16\n"
    f"public_key={HEX_B}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
    "persistent_keepalive_interval=0\nsome_future_key=whatever\n"
    "errno=0\n\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            f"private_key={HEX_PRIV}\nlisten_port=51999\nerrno=0\n\n",
            InterfaceState("wg0", PUB, 51999, {}),
            id="no-peers",
        ),
        pytest.param("errno=0\n\n", InterfaceState("wg0", None, None, {}), id="unconfigured"),
        pytest.param(
            GET_FULL,
            InterfaceState(
                "wg0",
                PUB,
                51999,
                {
                    A: PeerState(
                        A, ("100.96.0.2/32", "10.1.0.0/16"), "192.0.2.1:51820", 25, 1700000000.5, 92, 1184
                    ),
                    B: PeerState(B, (), None, 0, None, 0, 0),
                },
            ),
            id="two-peers",
        ),
    ],
)
def test_parse_get(text, expected):
    assert parse_get(text).state("wg0") == expected


def test_parse_get_keeps_private_key_and_fwmark_inside():
    device = parse_get(GET_FULL)
    assert device.private_key == PRIV and device.fwmark == 7


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param("", UapiProtocolError, id="empty"),
        pytest.param("listen_port=1\n", UapiProtocolError, id="truncated"),
        pytest.param("errno=2\n\n", UapiError, id="errno"),
        pytest.param("listen_port=x\nerrno=0\n\n", UapiProtocolError, id="bad-number"),
        pytest.param(f"public_key={HEX_A}\nrx_bytes=-\nerrno=0\n\n", UapiProtocolError, id="bad-counter"),
        pytest.param("garbage\nerrno=0\n\n", UapiProtocolError, id="no-equals"),
        pytest.param("public_key=abc\nerrno=0\n\n", UapiProtocolError, id="bad-key"),
        pytest.param("errno=x\n\n", UapiProtocolError, id="bad-errno"),
    ],
)
def test_parse_get_errors(text, error):
    with pytest.raises(error):
        parse_get(text)


@pytest.mark.parametrize(("text", "errno"), [("errno=0\n\n", 0), ("errno=-22\n\n", -22), ("errno=1\n\n", 1)])
def test_parse_errno(text, errno):
    assert parse_errno(text) == errno


def test_check_set_response_carries_errno():
    check_set_response("errno=0\n\n")
    with pytest.raises(UapiError) as info:
        check_set_response("errno=22\n\n")
    assert info.value.errno == 22 and info.value.temporary
