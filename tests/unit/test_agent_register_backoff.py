"""The registration's backoff (nodeagent.registration.RegistrationExchange.register) starts over when the
registrar comes online: found by the chaos bench (docs/chaos.md series 6), where a request lost right after a
registrar restart was retried only after a backoff grown during the outage (9.5 s)."""

from __future__ import annotations

import threading
from pathlib import Path

from nodeagent import registration
from nodeagent.connection import Connection
from nodeagent.identity import Identity
from nodeagent.registration import RegistrationExchange, ReplyBox
from nodeagent.settings import AgentSettings
from nodeagent.statestore import StateStore
from nodeagent.underlay import FixedEndpoints


class SilentBroker:
    """A paho client whose publishes get no answer; `on_publish(n)` runs at the n-th (1-based)."""

    def __init__(self, on_publish) -> None:
        self.published = 0
        self._on_publish = on_publish

    def publish(self, topic, payload, qos=0, retain=False):
        self.published += 1
        self._on_publish(self.published)


def test_the_backoff_starts_over_when_the_registrar_comes_online(tmp_path: Path, monkeypatch) -> None:
    attempts: list[int] = []
    monkeypatch.setattr(registration.policy, "backoff_delay",
                        lambda attempt, **kw: (attempts.append(attempt), 0.01)[1])  # fmt: skip
    replies = ReplyBox()
    lost = threading.Event()

    def on_publish(n: int) -> None:
        if n == 4:  # the registrar restarted: it says online (live, not retained) as our 4th request goes out
            replies.registrar_status(online=False, retained=False)
            replies.registrar_status(online=True, retained=False)
        if n == 6:
            lost.set()

    conn = Connection(client=SilentBroker(on_publish), epoch=1, connected=threading.Event(),
                      subscribed=threading.Event(), lost=lost)  # fmt: skip
    exchange = RegistrationExchange(
        AgentSettings(state_dir=tmp_path, register_timeout_s=0.05),
        identity=lambda: Identity(node_id="n1", name="n1", public_key="k" * 43 + "="),
        store=StateStore(tmp_path), endpoints=FixedEndpoints([]), registrar=None, replies=replies,
        fields=lambda **kw: {},
    )  # fmt: skip
    assert exchange.register(conn) is None  # the connection was lost at the 6th request
    # Three unanswered requests grow the backoff (0, 1, 2); the 4th is sent again at once for the registrar that
    # came online, and the 5th, unanswered too, waits like a first retry.
    assert attempts == [0, 1, 2, 0]
