"""`Heartbeats.probe_lost_soon`: the probes after a membership change, on a thread of the agent's own (a
one-off APScheduler job that came due while the scheduler shut down killed its thread with JobLookupError)."""

from __future__ import annotations

import threading

from polling import wait_for

from nodeagent.heartbeats import Heartbeats
from nodeagent.identity import Identity
from nodeagent.meshstate import MeshState
from wgctl.memory import InMemoryWireGuard


class Pinger:
    def ping(self, ip: str, *, count: int) -> list[float | None]:
        return [None] * count


def heartbeats() -> Heartbeats:
    return Heartbeats(session=None, mesh=MeshState(), wireguard=InMemoryWireGuard(), interface="mv0",  # type: ignore[arg-type]
                      identity=lambda: Identity(node_id="n1", name="n1"), pinger=Pinger(), clock=lambda: 0.0,
                      fields=dict)  # fmt: skip


def test_a_burst_of_changes_is_probed_once_more_after_the_run_it_waited_for() -> None:
    hb = heartbeats()
    release, started, runs = threading.Event(), threading.Event(), []

    def probe_lost() -> dict:
        runs.append(threading.current_thread().name)
        started.set()
        release.wait(10)
        return {}

    hb.probe_lost = probe_lost  # type: ignore[method-assign]
    try:
        hb.probe_lost_soon()
        assert started.wait(10)
        for _ in range(20):  # changes while the first run is busy: one more run serves them all
            hb.probe_lost_soon()
        release.set()
        wait_for(lambda: len(runs) == 2, what="the second run")
        hb.probe_lost_soon()
        wait_for(lambda: len(runs) == 3, what="a later change probed again")
        assert all(name.startswith("probe-lost") for name in runs), runs
    finally:
        release.set()
        hb.close()


def test_a_failing_probe_run_is_logged_and_the_next_change_runs_again(caplog) -> None:
    hb = heartbeats()
    runs = []

    def probe_lost() -> dict:
        runs.append(1)
        raise RuntimeError("boom")

    hb.probe_lost = probe_lost  # type: ignore[method-assign]
    try:
        hb.probe_lost_soon()
        wait_for(lambda: "probing the members the control plane lost failed" in caplog.text, what="the log")
        hb.probe_lost_soon()
        wait_for(lambda: len(runs) == 2, what="a second run")
    finally:
        hb.close()


def test_nothing_is_probed_after_close() -> None:
    hb = heartbeats()
    runs = []
    hb.probe_lost = lambda: runs.append(1) or {}  # type: ignore[method-assign]
    hb.close()
    hb.probe_lost_soon()
    hb.probe_lost_soon()
    assert runs == []
