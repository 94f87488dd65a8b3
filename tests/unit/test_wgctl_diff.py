"""The pure peer plan: add missing, update changed, remove extra, never touch what is already right."""

from __future__ import annotations

import pytest

from wgctl.diff import (
    canonical_cidr,
    canonical_endpoint,
    peer_differs,
    plan,
    split_endpoint,
    validated_peer,
)
from wgctl.errors import InvalidConfigError, InvalidKeyError
from wgctl.model import PeerChanges, PeerConfig, PeerState

A = "A" * 43 + "="
B = "B" * 43 + "="
C = "C" * 43 + "="
# "A"*43 + "=" decodes to 32 bytes, so these are well-formed keys for validated_peer too.


def cfg(key: str, *ips: str, endpoint: str | None = None, keepalive: int = 0) -> PeerConfig:
    return PeerConfig(key, tuple(ips), endpoint, keepalive)


def state(key: str, *ips: str, endpoint: str | None = None, keepalive: int = 0, **kw) -> PeerState:
    return PeerState(key, tuple(ips), endpoint, keepalive, **kw)


def by_key(*peers):
    return {p.public_key: p for p in peers}


@pytest.mark.parametrize(
    ("desired", "actual", "expected"),
    [
        pytest.param([], [], PeerChanges(), id="both-empty"),
        pytest.param([cfg(A, "100.96.0.2/32")], [], PeerChanges(upsert=(cfg(A, "100.96.0.2/32"),)), id="add"),
        pytest.param([], [state(A, "100.96.0.2/32")], PeerChanges(remove=(A,)), id="remove"),
        pytest.param(
            [cfg(A, "100.96.0.2/32", endpoint="10.0.0.2:51820", keepalive=25)],
            [
                state(
                    A,
                    "100.96.0.2/32",
                    endpoint="10.0.0.2:51820",
                    keepalive=25,
                    latest_handshake=5.0,
                    rx_bytes=9,
                )
            ],
            PeerChanges(),
            id="unchanged-ignores-counters",
        ),
        pytest.param(
            [cfg(A, "100.96.0.2/32", "10.1.0.0/24")],
            [state(A, "10.1.0.0/24", "100.96.0.2/32")],
            PeerChanges(),
            id="allowed-ips-order-irrelevant",
        ),
        pytest.param(
            [cfg(A, "10.1.0.7/24")],
            [state(A, "10.1.0.0/24")],
            PeerChanges(),
            id="allowed-ips-host-bits-ignored",
        ),
        pytest.param(
            [cfg(A, "100.96.0.3/32")],
            [state(A, "100.96.0.2/32")],
            PeerChanges(upsert=(cfg(A, "100.96.0.3/32"),)),
            id="allowed-ips-changed",
        ),
        pytest.param(
            [cfg(A, "100.96.0.2/32", endpoint="10.0.0.9:51820")],
            [state(A, "100.96.0.2/32", endpoint="10.0.0.2:51820")],
            PeerChanges(upsert=(cfg(A, "100.96.0.2/32", endpoint="10.0.0.9:51820"),)),
            id="endpoint-changed",
        ),
        pytest.param(
            [cfg(A, "100.96.0.2/32")],
            [state(A, "100.96.0.2/32", endpoint="198.51.100.7:40000")],
            PeerChanges(),
            id="no-desired-endpoint-keeps-learned-one",
        ),
        pytest.param(
            [cfg(A, "100.96.0.2/32", endpoint="[2001:db8:0::1]:51820")],
            [state(A, "100.96.0.2/32", endpoint="[2001:db8::1]:51820")],
            PeerChanges(),
            id="ipv6-endpoint-canonical",
        ),
        pytest.param(
            [cfg(A, "100.96.0.2/32", keepalive=25)],
            [state(A, "100.96.0.2/32")],
            PeerChanges(upsert=(cfg(A, "100.96.0.2/32", keepalive=25),)),
            id="keepalive-changed",
        ),
        pytest.param(
            [cfg(C, "100.96.0.4/32"), cfg(A, "100.96.0.2/32"), cfg(B, "100.96.0.9/32")],
            [state(B, "100.96.0.3/32"), state("D" * 43 + "=", "100.96.0.5/32"), state(A, "100.96.0.2/32")],
            PeerChanges(upsert=(cfg(B, "100.96.0.9/32"), cfg(C, "100.96.0.4/32")), remove=("D" * 43 + "=",)),
            id="mixed-sorted-and-unchanged-untouched",
        ),
    ],
)
def test_plan(desired, actual, expected):
    assert plan(by_key(*desired), by_key(*actual)) == expected


def test_plan_of_converged_state_is_empty():
    desired = by_key(*(cfg(f"{i:043d}=", f"100.96.{i // 250}.{i % 250 + 1}/32") for i in range(300)))
    actual = {k: state(k, *p.allowed_ips) for k, p in desired.items()}
    assert plan(desired, actual).is_empty()


@pytest.mark.parametrize(
    "mapping",
    [
        pytest.param({"desired": {A: cfg(B, "100.96.0.2/32")}}, id="desired-miskeyed"),
        pytest.param({"actual": {A: state(B, "100.96.0.2/32")}}, id="actual-miskeyed"),
    ],
)
def test_plan_rejects_miskeyed_mappings(mapping):
    with pytest.raises(ValueError):
        plan(mapping.get("desired", {}), mapping.get("actual", {}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100.96.0.5/32", "100.96.0.5/32"),
        ("100.96.0.5", "100.96.0.5/32"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        (" 0.0.0.0/0 ", "0.0.0.0/0"),
        ("fd00:0:0::1/64", "fd00::/64"),
        ("fd00::1", "fd00::1/128"),
    ],
)
def test_canonical_cidr(text, expected):
    assert canonical_cidr(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("10.0.0.1:51820", "10.0.0.1:51820"),
        ("[2001:DB8:0::1]:51820", "[2001:db8::1]:51820"),
        ("Node-A.example:51820", "node-a.example:51820"),
        ("10.0.0.1:051820", "10.0.0.1:51820"),
        ("no-port", "no-port"),
    ],
)
def test_canonical_endpoint(text, expected):
    assert canonical_endpoint(text) == expected


@pytest.mark.parametrize(
    ("desired", "actual", "differs"),
    [
        (cfg(A, "1.2.3.4/32"), cfg(A, "1.2.3.4/32"), False),
        (cfg(A, "1.2.3.4/32"), cfg(B, "1.2.3.4/32"), True),
        (cfg(A, "1.2.3.4/32", "1.2.3.4/32"), cfg(A, "1.2.3.4/32"), False),
        (cfg(A), cfg(A, "1.2.3.4/32"), True),
        (cfg(A, endpoint="1.1.1.1:1"), cfg(A), True),
        (cfg(A), cfg(A, endpoint="1.1.1.1:1"), False),
    ],
)
def test_peer_differs(desired, actual, differs):
    assert peer_differs(desired, actual) is differs


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("192.0.2.1:51820", ("192.0.2.1", 51820)),
        ("[2001:db8::1]:1", ("2001:db8::1", 1)),
    ],
)
def test_split_endpoint(endpoint, expected):
    assert split_endpoint(endpoint) == expected


@pytest.mark.parametrize(
    "endpoint",
    ["node-a.example:51820", "192.0.2.1", "192.0.2.1:0", "192.0.2.1:65536", "2001:db8::1:51820", ""],
)
def test_split_endpoint_rejects(endpoint):
    with pytest.raises(InvalidConfigError):
        split_endpoint(endpoint)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (cfg(A, "10.1.2.3/24", "10.1.2.0/24", "100.96.0.2"), cfg(A, "10.1.2.0/24", "100.96.0.2/32")),
        (cfg(A, endpoint="[2001:DB8::1]:5", keepalive=25), cfg(A, endpoint="[2001:db8::1]:5", keepalive=25)),
    ],
)
def test_validated_peer(peer, expected):
    assert validated_peer(peer) == expected


@pytest.mark.parametrize(
    ("peer", "error"),
    [
        (cfg("nope", "10.0.0.1/32"), InvalidKeyError),
        (cfg(A, "10.0.0.300/32"), InvalidConfigError),
        (cfg(A, endpoint="host:1"), InvalidConfigError),
        (cfg(A, keepalive=65536), InvalidConfigError),
    ],
)
def test_validated_peer_rejects(peer, error):
    with pytest.raises(error):
        validated_peer(peer)
