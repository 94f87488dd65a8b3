"""The registrar's counters and their export: every counter kept is exported, numbers keep their precision."""

from __future__ import annotations

import pytest

from registrar.api import render_metrics
from registrar.metrics import COUNTERS, Counters


def test_counters_refuse_an_undeclared_name():
    counters = Counters()
    counters.add("registrations")
    with pytest.raises(KeyError):
        counters.add("registration")  # a typo must not become a counter nobody exports


def test_a_snapshot_is_a_read_only_copy():
    counters = Counters()
    snapshot = counters.snapshot()
    counters.add("messages", 3)
    assert snapshot["messages"] == 0 and counters.snapshot()["messages"] == 3
    with pytest.raises(TypeError):
        snapshot["messages"] = 5  # type: ignore[index]
    assert set(snapshot) == {spec.key for spec in COUNTERS}


def test_every_counter_is_exported():
    counters = Counters()
    for n, spec in enumerate(COUNTERS, start=1):
        counters.add(spec.key, n)
    text = render_metrics({f"counter_{k}": float(v) for k, v in counters.snapshot().items()})
    for n, spec in enumerate(COUNTERS, start=1):
        assert f"# TYPE meshvpn_registrar_{spec.metric} counter" in text
        assert f"\nmeshvpn_registrar_{spec.metric} {n}\n" in text
    position = next(n for n, spec in enumerate(COUNTERS, start=1) if spec.key == "internal_errors")
    assert f"meshvpn_registrar_internal_errors_total {position}" in text


@pytest.mark.parametrize(
    ("values", "line"),
    [
        ({"counter_messages": 1234567.0}, "meshvpn_registrar_messages_total 1234567"),
        ({"liveness_checked_at": 1712345678.25}, "meshvpn_registrar_liveness_checked_timestamp_seconds 1712345678.25"),
        ({"members_active": 3.0}, 'meshvpn_registrar_members{state="active"} 3'),
        ({}, 'meshvpn_registrar_members{state="unreachable"} 0'),
        ({}, "meshvpn_registrar_store_errors_total 0"),
    ],
)
def test_numbers_keep_their_precision(values, line):
    assert line in render_metrics(values).splitlines()


def test_a_gauge_without_a_value_is_left_out():
    assert "liveness_checked" not in render_metrics({})
