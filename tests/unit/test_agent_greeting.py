"""Session checks for peers just added (nodeagent.greeting): when they go out, to whom, and that they can only
leave through the mesh interface. The reconciler's side (who counts as added) is in test_agent_reconciler."""

from __future__ import annotations

import socket

import pytest

from nodeagent.greeting import DISCARD_PORT, Greeter, send_datagrams


class Recorder:
    def __init__(self, fail: OSError | None = None) -> None:
        self.sent: list[tuple[str, tuple[str, ...]]] = []
        self.fail = fail

    def __call__(self, interface: str, ips) -> None:
        self.sent.append((interface, tuple(ips)))
        if self.fail is not None:
            raise self.fail


def test_each_greeting_sends_once_per_delay_to_every_peer_added() -> None:
    send = Recorder()
    greeter = Greeter("mv0", send=send, after_s=(0.0, 0.01, 0.02))
    greeter.greet(["100.96.0.2", "100.96.0.3"]).join(timeout=5)
    assert send.sent == [("mv0", ("100.96.0.2", "100.96.0.3"))] * 3


def test_nothing_to_greet_starts_nothing() -> None:
    assert Greeter("mv0", send=Recorder()).greet([]) is None


def test_a_closed_greeter_stops_before_its_next_datagram() -> None:
    send = Recorder()
    greeter = Greeter("mv0", send=send, after_s=(0.0, 30.0))
    thread = greeter.greet(["100.96.0.2"])
    greeter.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(send.sent) <= 1
    assert greeter.greet(["100.96.0.3"]) is None


def test_an_interface_that_cannot_send_ends_the_greeting_quietly() -> None:
    send = Recorder(fail=OSError(19, "No such device"))
    Greeter("mv0", send=send, after_s=(0.0, 0.0, 0.0)).greet(["100.96.0.2"]).join(timeout=5)
    assert len(send.sent) == 1


def test_datagrams_are_bound_to_the_interface_and_go_to_the_discard_port(monkeypatch) -> None:
    calls = []

    class FakeSocket:
        def __init__(self, family, kind) -> None:
            calls.append(("socket", family, kind))

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            calls.append(("close",))

        def setsockopt(self, level, option, value) -> None:
            calls.append(("setsockopt", level, option, value))

        def sendto(self, payload, address) -> None:
            calls.append(("sendto", address))
            if address[0] == "100.96.0.9":
                raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "socket", FakeSocket)
    send_datagrams("mv0", ["100.96.0.2", "100.96.0.9", "100.96.0.3", "fd00::5"])
    assert ("setsockopt", socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"mv0") in calls
    sent = [c[1] for c in calls if c[0] == "sendto"]
    # One unreachable address does not stop the others; IPv6 peers get a socket of their family.
    assert sent == [("100.96.0.2", DISCARD_PORT), ("100.96.0.9", DISCARD_PORT), ("100.96.0.3", DISCARD_PORT),
                    ("fd00::5", DISCARD_PORT)]
    assert [c[1] for c in calls if c[0] == "socket"] == [socket.AF_INET, socket.AF_INET6]


def test_no_such_interface_is_an_error_of_the_whole_send() -> None:
    with pytest.raises(OSError):
        send_datagrams("mv-no-such-if0", ["127.0.0.1"])
