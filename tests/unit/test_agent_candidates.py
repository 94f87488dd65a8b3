"""The endpoint candidates a node advertises (nodeagent.candidates) and the Advertiser that keeps them current
(nodeagent.underlay, on in-memory addresses and a fixed reflection). Table-driven; no network."""

from __future__ import annotations

import threading

import pytest

from meshcontract.messages import Endpoint, EndpointKind
from nodeagent.candidates import (
    MAX_ADVERTISED,
    InterfaceAddress,
    advertised,
    local_addresses,
    reflect_due,
    usable_local,
    usable_reflection,
)
from nodeagent.underlay import Advertiser, InMemoryAddresses, StaticReflector

L, P, R = EndpointKind.LOCAL, EndpointKind.PUBLIC, EndpointKind.REFLEXIVE


@pytest.mark.parametrize(
    ("address", "usable"),
    [
        ("192.168.1.5", True),
        ("10.0.0.1", True),
        ("100.64.3.4", True),  # carrier-grade NAT space: what a node behind CGNAT has
        ("203.0.113.5", True),
        ("127.0.0.1", False),
        ("169.254.10.1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("240.0.0.1", False),
        ("2001:4860::1", True),
        ("fd00::2", False),  # unique local: not global
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("::1", False),
        ("::ffff:192.0.2.1", False),
        ("not-an-ip", False),
    ],
)
def test_usable_local(address: str, usable: bool) -> None:
    assert usable_local(address) is usable


def test_local_addresses_filter_order_and_primary() -> None:
    found = [
        InterfaceAddress("lo", "127.0.0.1"),
        InterfaceAddress("eth0", "2001:4860::5"),
        InterfaceAddress("docker0", "172.17.0.1"),
        InterfaceAddress("eth0", "192.168.1.5"),
        InterfaceAddress("eth0", "fe80::5"),
        InterfaceAddress("meshvpn0", "100.96.0.5"),
        InterfaceAddress("wlan0", "10.1.1.5", up=False),
        InterfaceAddress("eth1", "192.168.1.5"),  # the same address twice
    ]
    assert local_addresses(found, exclude={"meshvpn0"}) == ["172.17.0.1", "192.168.1.5", "2001:4860::5"]
    got = local_addresses(found, exclude={"meshvpn0"}, primary="192.168.1.5")
    assert got == ["192.168.1.5", "172.17.0.1", "2001:4860::5"], "the default route's address first"
    assert local_addresses(found, exclude={"meshvpn0"}, primary="198.51.100.1")[0] == "172.17.0.1"


@pytest.mark.parametrize(
    ("reflected", "local", "usable"),
    [
        pytest.param("203.0.113.9", ["192.168.1.5"], "203.0.113.9", id="behind a NAT"),
        pytest.param("192.168.1.5", ["192.168.1.5"], None, id="one of ours: no NAT in between"),
        pytest.param("127.0.0.1", [], None, id="registrar on this machine"),
        pytest.param("fe80::1", [], None, id="link-local"),
        pytest.param(None, ["192.168.1.5"], None, id="no reflection"),
        pytest.param("garbage", [], None, id="not an address"),
    ],
)
def test_usable_reflection(reflected: str | None, local: list[str], usable: str | None) -> None:
    assert usable_reflection(reflected, local=local) == usable


def ep(host: str, kind: EndpointKind, port: int = 51820) -> Endpoint:
    return Endpoint(host=host, port=port, kind=kind)


@pytest.mark.parametrize(
    ("public", "local", "reflected", "expected"),
    [
        pytest.param(None, [], None, [], id="nothing known"),
        pytest.param(
            Endpoint(host="vpn.example.org", port=4500), ["192.168.1.5"], "203.0.113.9",
            [ep("vpn.example.org", P, 4500), ep("203.0.113.9", R), ep("192.168.1.5", L)],
            id="public, reflexive, local",
        ),
        pytest.param(
            None, ["192.168.1.5", "10.0.0.5"], "10.0.0.5", [ep("192.168.1.5", L), ep("10.0.0.5", L)],
            id="a reflection equal to any local address is no NAT's",
        ),
        pytest.param(
            Endpoint(host="192.168.1.5", port=51820), ["192.168.1.5"], None, [ep("192.168.1.5", P)],
            id="the configured endpoint is also a local address: listed once, as public",
        ),
        pytest.param(
            Endpoint(host="203.0.113.9", port=51820), [], "203.0.113.9", [ep("203.0.113.9", P)],
            id="reflection equal to the public endpoint",
        ),
        pytest.param(
            None, [f"10.0.0.{i}" for i in range(1, 10)], None, [ep(f"10.0.0.{i}", L) for i in range(1, 5)],
            id="local addresses are capped",
        ),
    ],
)  # fmt: skip
def test_advertised(public, local, reflected, expected) -> None:
    got = advertised(public=public, local=local, reflected=reflected, port=51820)
    assert got == expected
    assert len(got) <= MAX_ADVERTISED


@pytest.mark.parametrize(
    ("last_at", "now", "local_changed", "failed", "due"),
    [
        (None, 0.0, False, False, True),
        (100.0, 130.0, False, False, False),
        (100.0, 160.0, False, False, True),
        (100.0, 101.0, True, False, True),
        (100.0, 101.0, False, True, True),
    ],
)
def test_reflect_due(last_at: float | None, now: float, local_changed: bool, failed: bool, due: bool) -> None:
    assert reflect_due(last_at=last_at, now=now, local_changed=local_changed, failed=failed) is due


class CountingReflector(StaticReflector):
    def __init__(self, address: str | None) -> None:
        super().__init__(address)
        self.asked = 0

    def reflect(self) -> str | None:
        self.asked += 1
        return super().reflect()


def test_advertiser_follows_addresses_and_reflection() -> None:
    now = [1000.0]
    addresses = InMemoryAddresses([InterfaceAddress("eth0", "192.168.1.5"), InterfaceAddress("meshvpn0", "100.96.0.5")])
    reflector = CountingReflector("203.0.113.9")
    advertiser = Advertiser(
        public=None, listen_port=51820, interface="meshvpn0", addresses=addresses, reflector=reflector,
        clock=lambda: now[0],
    )  # fmt: skip
    assert advertiser.current() == [], "nothing read yet"
    assert advertiser.refresh(reflect=False) and reflector.asked == 0
    assert advertiser.current() == [ep("192.168.1.5", L)]
    assert advertiser.moves == 0, "the first read is no move"
    assert advertiser.before_registration() == [ep("203.0.113.9", R), ep("192.168.1.5", L)]
    assert reflector.asked == 1 and advertiser.reflected == "203.0.113.9"

    now[0] += 10
    assert not advertiser.refresh() and reflector.asked == 1, "nothing changed, reflection not due yet"
    # The laptop moves to another network: a new address, and the registrar is asked at once.
    addresses.set([InterfaceAddress("wlan0", "10.7.0.3")])
    reflector.address = "198.51.100.4"
    assert advertiser.refresh() and reflector.asked == 2
    assert advertiser.current() == [ep("198.51.100.4", R), ep("10.7.0.3", L)]
    assert advertiser.moves == 1
    # The registrar cannot be asked on a periodic check: the last reflection stays, asked again next time.
    reflector.address = None
    now[0] += 61
    assert not advertiser.refresh() and reflector.asked == 3 and advertiser.reflected == "198.51.100.4"
    now[0] += 10
    assert not advertiser.refresh() and reflector.asked == 4, "a failure is retried at the next check"
    # Before a registration, no answer means no reflexive candidate this time.
    assert advertiser.before_registration() == [ep("10.7.0.3", L)] and advertiser.reflected is None
    reflector.address = "198.51.100.4"
    assert advertiser.refresh() and reflector.asked == 6, "back at the next check"


def test_advertiser_keeps_the_last_addresses_when_they_cannot_be_read() -> None:
    class Broken(InMemoryAddresses):
        def addresses(self) -> list[InterfaceAddress]:
            raise OSError("netlink says no")

    advertiser = Advertiser(
        public=Endpoint(host="vpn.example.org", port=51820), listen_port=51820, interface="meshvpn0",
        addresses=Broken(), reflector=None,
    )  # fmt: skip
    assert not advertiser.refresh()
    assert advertiser.current() == [ep("vpn.example.org", P)]


def test_prepared_endpoints_are_those_before_registration_asked_on_another_thread() -> None:
    """EndpointSource.prepare: the session asks the registrar while it connects to the broker, and registers
    with what that gave; an error reaches the caller as if before_registration() had raised it."""
    threads: list[str] = []

    class Recording(CountingReflector):
        def reflect(self) -> str | None:
            threads.append(threading.current_thread().name)
            return super().reflect()

    reflector = Recording("203.0.113.9")
    advertiser = Advertiser(
        public=None, listen_port=51820, interface="meshvpn0",
        addresses=InMemoryAddresses([InterfaceAddress("eth0", "192.168.1.5")]), reflector=reflector,
    )  # fmt: skip
    ready = advertiser.prepare()
    assert ready() == [ep("203.0.113.9", R), ep("192.168.1.5", L)]
    assert reflector.asked == 1 and threads != [threading.current_thread().name]
    assert ready() == [ep("203.0.113.9", R), ep("192.168.1.5", L)] and reflector.asked == 1, "asked once"

    class Failing(StaticReflector):
        def reflect(self) -> str | None:
            raise RuntimeError("a bug in the reflector")

    broken = Advertiser(public=None, listen_port=51820, interface="meshvpn0", addresses=InMemoryAddresses([]),
                        reflector=Failing())  # fmt: skip
    with pytest.raises(RuntimeError, match="a bug in the reflector"):
        broken.prepare()()
