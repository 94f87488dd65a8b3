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


def test_a_storm_counts_stream_messages_per_agent_and_what_the_old_protocol_would_have_sent():
    results = [
        bench.Result("done", 101.0, 116.5, 0, True, 100.2, 30, 30_000, 16, 16_500),
        bench.Result("done", 101.0, 112.0, 0, True, 100.2, 10, 10_000, 10, 10_000),
    ]
    m = bench.Measured(
        broker="mosquitto", nodes=2, enroll_s=1.0, connected_s=1.0, results=results, t0=100.0, committed_s=1.0,
        burst_cpu_s=0.1, burst_rss_kib=1024, heartbeat_interval_s=1.0, heartbeat_window_s=1.0, heartbeat_cpu_s=0.0,
        heartbeat_rss_kib=1024, publishes=3, observer_messages=2, observer_bytes=600,
    )  # fmt: skip
    figures = bench.summarize(m)
    assert figures["stream_messages_per_agent"] == 20 and figures["stream_messages_max_agent"] == 16
    assert figures["stream_bytes_per_agent"] == 20_000 and figures["stream_bytes_max_agent"] == 16_500
    # every changed record to every agent, plus a roster of all N with each of the 3 batches
    assert figures["old_messages_per_agent"] == 2 + 3
    assert figures["old_bytes_per_agent"] == 600 + 3 * bench.old_roster_bytes(2)


def test_the_old_roster_grows_with_every_member():
    one, thousand = bench.old_roster_bytes(1), bench.old_roster_bytes(1000)
    entry = len('{"node_id":"node00000","revision":1000},')
    assert thousand - one == pytest.approx(999 * entry, rel=0.01)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([3.0], 95, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),  # nearest rank: the 2nd of 4
        ([float(i) for i in range(1, 101)], 95, 95.0),
        ([float(i) for i in range(1, 101)], 100, 100.0),
        ([5.0, 1.0, 3.0], 0, 1.0),
    ],
)
def test_percentile_is_nearest_rank(values, q, expected):
    assert bench.percentile(values, q) == expected


def test_churn_figures_pool_every_agent_of_every_round_and_count_rounds_that_never_completed():
    m = bench.ChurnMeasured(
        broker="amqtt", nodes=4, connected_s=3.0,
        joins=[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], leaves=[[0.25, 0.25, 0.5], None], loadavg=3.5,
    )  # fmt: skip
    figures = bench.summarize_churn(m)
    assert figures["join_samples"] == 6 and figures["join_p50_s"] == 0.3 and figures["join_p95_s"] == 0.6
    assert figures["leave_rounds_incomplete"] == 1 and figures["leave_max_s"] == 0.5
    assert REQUIRED <= set(figures) and figures["full_roster_s"] is None


def test_churn_figures_on_a_sample_say_how_many_agents_were_timed_and_what_the_registrar_used():
    m = bench.ChurnMeasured(
        broker="mosquitto", nodes=10_000, connected_s=30.0, joins=[[0.1, 0.2]], leaves=[[0.3]], agents=200,
        light_closed=0, light_sent=49_000, registrar_received=50_000, enroll_calls=(0.5, 0.25, 1.0), window_s=25.0,
        registrar_cpu_s=10.0, registrar_rss_kib=150 * 1024, broker_cpu_s=5.0,
        broker_rss_kib=100 * 1024,
    )  # fmt: skip
    figures = bench.summarize_churn(m)
    assert figures["agents"] == 200 and figures["light_nodes"] == 9_800 and figures["light_connections_closed"] == 0
    assert figures["registrar_cpu_pct"] == 40.0 and figures["registrar_rss_mb"] == 150.0
    assert figures["broker_cpu_pct"] == 20.0 and figures["broker_rss_mb"] == 100.0
    assert figures["join_enroll_call_p50_s"] == 0.5 and figures["join_enroll_call_max_s"] == 1.0
    assert figures["light_heartbeats_sent_per_s"] == 1960 and figures["registrar_messages_per_s"] == 2000


def test_churn_figures_without_a_window_leave_cpu_unmeasured_and_count_every_member_an_agent():
    figures = bench.summarize_churn(bench.ChurnMeasured("amqtt", 4, 1.0, [[0.1]], [[0.2]]))
    assert figures["agents"] == 4 and figures["light_nodes"] == 0
    assert figures["registrar_cpu_pct"] is None and figures["registrar_rss_mb"] is None


@pytest.mark.parametrize(
    ("n", "k", "agents", "light"),
    [
        (5, 0, [0, 1, 2, 3, 4], []),  # no sample: every member a full agent
        (5, 5, [0, 1, 2, 3, 4], []),
        (5, 9, [0, 1, 2, 3, 4], []),  # more than N: still N
        (10, 2, [0, 5], [1, 2, 3, 4, 6, 7, 8, 9]),  # spread evenly over the range
        (7, 3, [0, 2, 4], [1, 3, 5, 6]),
        (10_000, 200, list(range(0, 10_000, 50)), None),
    ],
)
def test_a_sample_splits_the_members_into_agents_and_light_nodes(n, k, agents, light):
    got_agents, got_light = bench.sample_split(n, k)
    assert got_agents == agents
    if light is not None:
        assert got_light == light
    assert sorted(got_agents + got_light) == list(range(n))  # every member once


def test_heartbeat_figures_say_whether_the_registrar_kept_up():
    m = bench.HeartbeatMeasured(
        broker="mosquitto", nodes=10_000, interval_s=5.0, connected_s=20.0, window_s=60.0, sent=120_000,
        received=114_000, closed=0, registrar_cpu_s=12.0, registrar_rss_kib=200 * 1024, broker_cpu_s=6.0,
        broker_rss_kib=100 * 1024,
    )  # fmt: skip
    figures = bench.summarize_heartbeats(m)
    assert figures["heartbeats_sent_per_s"] == 2000 and figures["heartbeats_received_per_s"] == 1900
    assert figures["received_of_sent"] == 0.95
    assert figures["registrar_cpu_pct"] == 20.0 and figures["broker_cpu_pct"] == 10.0
    assert figures["registrar_rss_mb"] == 200.0 and REQUIRED <= set(figures)


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        # PUBLISH QoS 0: fixed header, remaining length, topic length + topic, payload
        (lambda: bench.mqtt_publish("a/b", b"hi"), b"\x30\x07\x00\x03a/bhi"),
        # SUBSCRIBE: packet id, then each filter with QoS 0
        (lambda: bench.mqtt_subscribe(1, ["x"]), b"\x82\x06\x00\x01\x00\x01x\x00"),
        # CONNECT 3.1.1, clean session with username and password, keepalive 60
        (lambda: bench.mqtt_connect("c", "u", "p"),
         b"\x10\x13\x00\x04MQTT\x04\xc2\x00\x3c\x00\x01c\x00\x01u\x00\x01p"),
        # remaining length over 127 takes two bytes
        (lambda: bench.mqtt_publish("t", b"x" * 200)[:3], b"\x30\xcb\x01"),
    ],
)
def test_light_nodes_speak_mqtt_311(packet, expected):
    assert packet() == expected
