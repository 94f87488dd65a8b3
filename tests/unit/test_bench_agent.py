"""bench/bench_agent.py's pure part: /proc parsing and the start-up marks read from an agent's log."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(_BENCH))  # bench_agent imports bench_lab as a sibling script does
_spec = importlib.util.spec_from_file_location("bench_agent", _BENCH / "bench_agent.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param([], {}, id="no-log-yet"),
        pytest.param(
            [(10.4, "using the userspace WireGuard backend"), (10.6, "agent starting: interface x"),
             (10.8, "registered as 100.96.0.1/16"), (11.0, "registered as 100.96.0.1/16")],
            {"first log line": 0.4, "agent starting": 0.6, "registered as": 0.8},
            id="join-first-of-each",
        ),
        pytest.param(
            [(10.3, "using the kernel WireGuard backend"), (10.5, "agent starting: interface x")],
            {"first log line": 0.3, "agent starting": 0.5},
            id="not-registered",
        ),
    ],
)
def test_startup_marks(events, expected):
    got = bench.startup_marks(events, 10.0)
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v) for k, v in expected.items())


def test_parse_cpu_ticks_with_parens_in_the_name():
    stat = "42 (a (b) c) S " + " ".join(str(i) for i in range(4, 30))
    # utime is field 14, stime field 15 of /proc/<pid>/stat
    assert bench.parse_cpu_ticks(stat) == 14 + 15


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        pytest.param(
            {"first log line": 0.4, "enrolled in mesh": 0.45, "agent starting": 0.46, "started wireguard-go": 0.48,
             "connected to the broker": 0.52, "registering": 0.55, "registered as": 0.57, "cpu": 0.3},
            {"first log line": 0.4, "enrolled in mesh": 0.05, "agent starting": 0.01, "started wireguard-go": 0.02,
             "connected to the broker": 0.04, "registering": 0.03, "registered as": 0.02, "after imports": 0.17},
            id="join-every-step",
        ),
        pytest.param(
            {"first log line": 0.3, "agent starting": 0.31, "connected to the broker": 0.35, "registering": 0.36,
             "registered as": 0.38},
            {"first log line": 0.3, "agent starting": 0.01, "connected to the broker": 0.04, "registering": 0.01,
             "registered as": 0.02, "after imports": 0.08},
            id="restart-skips-enrollment-and-wireguard-go",
        ),
        pytest.param({"first log line": 0.3}, {"first log line": 0.3}, id="not-registered"),
    ],
)
def test_step_times(run, expected):
    got = bench.step_times(run)
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v) for k, v in expected.items())
