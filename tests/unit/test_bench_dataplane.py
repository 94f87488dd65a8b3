"""bench/bench_dataplane.py's summary: rounds are paired by number, ratios are per round, the order is split out.

docs/benchmarks.md quotes these figures; the bench itself needs root and minutes, so its pure part is tested here.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "bench_dataplane.py"
_spec = importlib.util.spec_from_file_location("bench_dataplane", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def run(kind: str, round_: int, position: int, gbps: float) -> object:
    return bench.Run(kind, round_, position, 3.0, gbps, 0, gbps * 3.0 * 4.0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("rounds", "of_medians", "median_round", "ran_first", "ran_second"),
    [
        # Equal in every round, whichever ran first.
        ([(0.2, 0.2), (0.3, 0.3)], 1.0, 1.0, 1.0, 1.0),
        # The agent ran first in round 0 and was slower; second in round 1 and as fast.
        ([(0.1, 0.2), (0.3, 0.3)], 0.2 / 0.25, 0.75, 0.5, 1.0),
        # Ratios are per round, not of pooled values: a slow round for both does not bias them.
        ([(0.1, 0.1), (0.4, 0.4), (0.2, 0.2)], 1.0, 1.0, 1.0, 1.0),
    ],
)
def test_ratios_are_paired_by_round(rounds, of_medians, median_round, ran_first, ran_second):
    # Even rounds: agent first; odd rounds: hand first (what the bench's alternation does with two kinds).
    runs = []
    for n, (agent, hand) in enumerate(rounds):
        runs += [run("agent", n, n % 2, agent), run("hand", n, 1 - n % 2, hand)]
    ratio = bench.summary(runs, ["agent", "hand"])["ratios"]["agent/hand"]
    assert ratio["of_medians"] == pytest.approx(of_medians)
    assert ratio["median_round"] == pytest.approx(median_round)
    assert ratio["ran_first"] == pytest.approx(ran_first)
    assert ratio["ran_second"] == pytest.approx(ran_second)


@pytest.mark.parametrize(
    ("ratios", "mean", "interval_contains_one"),
    [
        ([1.0, 1.0, 1.0], 1.0, True),
        ([0.5, 2.0], 1.0, True),  # halving and doubling cancel on a log scale
        ([0.8, 0.81, 0.79, 0.8], 0.8, False),
    ],
)
def test_geometric_mean_and_its_interval(ratios, mean, interval_contains_one):
    result = bench.geometric_mean(ratios)
    low, high = result["geomean_ci95"]
    assert result["geomean"] == pytest.approx(mean, rel=1e-3)
    assert low <= result["geomean"] <= high
    assert (low <= 1.0 <= high) is interval_contains_one
    assert math.isfinite(low) and math.isfinite(high)


def test_cpu_per_gbit_uses_the_run_length():
    runs = [run("agent", 0, 0, 0.25), run("hand", 0, 1, 0.25)]
    assert bench.summary(runs, ["agent", "hand"])["agent"]["wg_cpu_s_per_gbit"] == pytest.approx(4.0)
