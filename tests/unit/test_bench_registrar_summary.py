"""bench/bench_registrar.py's figures: what --json writes, from a run's raw measurements.

docs/benchmarks.md quotes these figures; the bench itself takes minutes and a broker, so its pure part is tested
here (tests/integration/test_bench_registrar.py runs it for real).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "bench_registrar.py"


def _load():
    # The script puts its checkout on sys.path and PYTHONPATH for its subprocesses: not for the rest of this run.
    path, env = list(sys.path), os.environ.get("PYTHONPATH")
    spec = importlib.util.spec_from_file_location("bench_registrar", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
        if env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env
    return module


bench = _load()
REQUIRED = {"nodes", "broker", "full_roster_s", "registrations_per_s", "registrar_cpu_pct", "registrar_rss_mb"}


def measured(results, *, committed_s=2.0, n=1000, t0=100.0):
    return bench.Measured(
        broker="mosquitto", nodes=n, enroll_s=40.0, connected_s=12.0, results=results, t0=t0,
        committed_s=committed_s, burst_cpu_s=2.345, burst_rss_kib=80 * 1024, heartbeat_interval_s=5.0,
        heartbeat_window_s=20.0, heartbeat_cpu_s=1.5, heartbeat_rss_kib=90 * 1024 + 512,
    )  # fmt: skip


def done(reply_at, complete_at, sent_at=100.2, checked=True):
    return bench.Result("done", reply_at, complete_at, 0, checked, sent_at)


@pytest.mark.parametrize(
    ("results", "committed_s", "expect"),
    [
        # Every worker done: times are the latest node's, from the burst's start.
        (
            [done(101.0, 116.5), done(103.25, 112.0)],
            2.5,
            {"all_complete": True, "full_roster_s": 16.5, "every_node_has_its_reply_s": 3.25,
             "every_request_sent_s": 0.2, "registrations_per_s": 400, "missing": 0, "signatures_checked": True},
        ),
        # One worker checked no signature: complete, but not verified.
        (
            [done(101.0, 116.5), done(101.0, 110.0, checked=False)],
            2.5,
            {"all_complete": True, "signatures_checked": False},
        ),
        # A worker timed out with 7 nodes short: no convergence times, the shortfall counted.
        (
            [done(101.0, 116.5), bench.Result("partial", 101.0, 0.0, 7, False, 100.2)],
            2.5,
            {"all_complete": False, "full_roster_s": None, "every_node_has_its_reply_s": None, "missing": 7,
             "signatures_checked": False},
        ),
        # A worker never answered; the registrar never committed everything.
        (
            [done(101.0, 116.5), None],
            None,
            {"all_complete": False, "full_roster_s": None, "workers_without_answer": 1, "registrations_per_s": None,
             "registrar_committed_all_s": None},
        ),
    ],
)
def test_summarize_derives_the_figures_from_the_raw_measurements(results, committed_s, expect):
    figures = bench.summarize(measured(results, committed_s=committed_s))
    assert {k: figures[k] for k in expect} == expect


def test_summarize_has_the_keys_the_issue_names_and_heartbeat_load_per_core():
    figures = bench.summarize(measured([done(101.0, 116.5)]))
    assert REQUIRED <= set(figures)
    assert figures["nodes"] == 1000 and figures["broker"] == "mosquitto"
    assert figures["registrar_cpu_pct"] == 7.5  # 1.5 s of CPU over a 20 s window
    assert figures["registrar_rss_mb"] == 90.5  # MiB
    assert figures["heartbeats_per_s"] == 200  # 1,000 nodes every 5 s
