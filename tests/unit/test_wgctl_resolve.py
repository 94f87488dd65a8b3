"""Endpoint resolution (IP literals need no lookup; `localhost` resolves from /etc/hosts, no network)."""

from __future__ import annotations

import pytest

from wgctl.errors import InvalidConfigError, ResolveError
from wgctl.resolve import resolve_endpoint


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("192.0.2.1:51820", "192.0.2.1:51820"),
        ("[2001:DB8::1]:51820", "[2001:db8::1]:51820"),
        ("localhost:51820", "127.0.0.1:51820"),
    ],
)
def test_resolve_endpoint(endpoint, expected):
    assert resolve_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["192.0.2.1", "host:0", "host:x", "[::1]:70000"])
def test_bad_ports(endpoint):
    with pytest.raises(InvalidConfigError):
        resolve_endpoint(endpoint)


def test_unresolvable_name_is_a_temporary_resolve_error():
    with pytest.raises(ResolveError) as info:
        resolve_endpoint("no-such-host.invalid:51820")
    assert info.value.temporary
