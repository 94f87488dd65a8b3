"""The background name resolver (nodeagent.resolver): cache, TTLs, timeouts, bounds. Lookups are a test function
that answers when the test says so; time is a fake clock."""

from __future__ import annotations

import threading

import pytest
from polling import wait_for

from nodeagent.resolver import NameResolver, system_lookup


class Dns:
    """A lookup function whose answers the test sets, and which can be made to hang."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.calls: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.lock = threading.Lock()

    def __call__(self, name: str) -> list[str]:
        with self.lock:
            self.calls.append(name)
        self.release.wait(10)
        if name not in self.answers:
            raise OSError(f"{name}: Name or service not known")
        return self.answers[name]


@pytest.fixture
def world():
    clock = [100.0]
    dns = Dns()
    changes = []
    resolver = NameResolver(
        lookup=dns, on_change=lambda: changes.append(1), clock=lambda: clock[0], ttl_s=60, negative_ttl_s=15,
        timeout_s=5, max_threads=2, max_names=3,
    )  # fmt: skip
    yield clock, dns, changes, resolver
    dns.release.set()
    resolver.close()


def settled(resolver: NameResolver, name: str):
    """Wait until `name` has an answer (an address or a failure) and return the lookup result."""
    return wait_for(
        lambda: r if ((r := resolver.lookup([name])).addresses or r.failed) else None, timeout=5, what=f"{name} answered"
    )


def test_answers_come_from_the_cache_and_wake_reconcile(world) -> None:
    clock, dns, changes, resolver = world
    dns.answers["vpn.example.org"] = ["198.51.100.7", "2001:db8::7"]
    first = resolver.lookup(["VPN.example.org"])
    assert first.addresses == {} and first.failed == {}, "nothing yet, and no waiting"
    assert settled(resolver, "vpn.example.org").addresses == {"vpn.example.org": "198.51.100.7"}
    assert changes, "the first answer wakes the reconcile loop"
    resolver.lookup(["vpn.example.org"] * 5)
    assert dns.calls == ["vpn.example.org"], "cached: asked once"


def test_ttl_refreshes_in_the_background_and_keeps_serving(world) -> None:
    clock, dns, changes, resolver = world
    dns.answers["a.example"] = ["192.0.2.1"]
    settled(resolver, "a.example")
    clock[0] += 61
    dns.answers["a.example"] = ["192.0.2.2"]
    assert resolver.lookup(["a.example"]).addresses == {"a.example": "192.0.2.1"}, "the old answer meanwhile"
    wait_for(lambda: resolver.lookup(["a.example"]).addresses == {"a.example": "192.0.2.2"}, timeout=5, what="refresh")
    assert len(changes) == 2 and dns.calls == ["a.example", "a.example"]


def test_failures_are_cached_for_the_negative_ttl(world) -> None:
    clock, dns, changes, resolver = world
    assert "not known" in settled(resolver, "nope.invalid").failed["nope.invalid"]
    clock[0] += 10
    resolver.lookup(["nope.invalid"])
    assert dns.calls == ["nope.invalid"], "not asked again before the negative TTL"
    clock[0] += 6
    dns.answers["nope.invalid"] = ["192.0.2.9"]
    wait_for(lambda: resolver.lookup(["nope.invalid"]).addresses, timeout=5, what="retried after the negative TTL")


def test_a_hanging_lookup_times_out_and_holds_its_thread(world) -> None:
    clock, dns, changes, resolver = world
    dns.release.clear()  # the system resolver hangs
    for name in ("h1.example", "h2.example", "h3.example"):
        dns.answers[name] = ["192.0.2.3"]
    resolver.lookup(["h1.example", "h2.example", "h3.example"])
    wait_for(lambda: len(dns.calls) == 2, timeout=5, what="two lookups running")
    assert sorted(dns.calls) == ["h1.example", "h2.example"], "at most max_threads at once"
    clock[0] += 5
    timed_out = resolver.lookup(["h1.example"])
    assert timed_out.failed == {"h1.example": "no answer within 5s"} and changes
    dns.release.set()  # the hung lookups return: their slots go to the waiting name
    wait_for(lambda: resolver.lookup(["h3.example"]).addresses, timeout=5, what="the queued name resolved")
    wait_for(lambda: resolver.lookup(["h1.example"]).addresses, timeout=5, what="a late answer still counts")


def test_the_cache_is_bounded(world) -> None:
    clock, dns, changes, resolver = world
    for i in range(4):
        dns.answers[f"n{i}.example"] = [f"192.0.2.{i}"]
    for i in range(3):
        settled(resolver, f"n{i}.example")
    settled(resolver, "n3.example")  # a fourth name: the least recently asked is forgotten
    assert resolver.lookup(["n1.example", "n2.example", "n3.example"]).addresses.keys() == {
        "n1.example", "n2.example", "n3.example"
    }  # fmt: skip
    assert resolver.lookup(["n0.example"]).addresses == {}, "n0 was forgotten and is looked up again"


def test_closed_resolver_starts_nothing(world) -> None:
    clock, dns, changes, resolver = world
    resolver.close()
    dns.answers["late.example"] = ["192.0.2.5"]
    resolver.lookup(["late.example"])
    assert dns.calls == []


def test_system_lookup_of_an_ip_literal_and_a_bad_name() -> None:
    assert system_lookup("127.0.0.1") == ["127.0.0.1"]
    with pytest.raises(OSError):
        system_lookup("bad..name")
