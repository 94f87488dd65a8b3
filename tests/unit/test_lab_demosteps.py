"""The demo's steps, verdict and summary table (meshlab.demosteps)."""

import pytest

from meshlab.demo import Demo
from meshlab.demosteps import (
    STEP_KEYS,
    STEPS,
    Check,
    expected_peer_counts,
    format_check,
    format_peer_counts,
    format_summary,
    summary_rows,
    verdict,
)

ALL = list(STEP_KEYS)


def _ok(step: str, what: str = "held", seconds: float = 1.0) -> Check:
    return Check(step, what, True, seconds)


def test_the_steps_cover_the_brief_final_demo_in_order():
    assert STEP_KEYS == ("control-plane", "join", "nat", "chat", "late-join", "leave", "agent-crash", "node-crash",
                         "control-outage", "invariants")
    assert len(set(STEP_KEYS)) == len(STEPS)
    assert all(s.title for s in STEPS)


@pytest.mark.parametrize(
    ("checks", "ran", "status"),
    [
        ([_ok(k) for k in ALL], ALL, 0),
        ([], ALL, 1),  # nothing checked proves nothing
        ([_ok(k) for k in ALL] + [Check("chat", "n1 -> n2", False, 3.0)], ALL, 1),
        ([_ok(k) for k in ALL[:3]], ALL[:3], 1),  # stopped early: later steps never ran
        ([_ok(k) for k in ALL], list(reversed(ALL)), 1),  # ran, but not as the script says
    ],
)
def test_verdict(checks, ran, status):
    assert verdict(checks, ran=ran) == status


def test_summary_rows_list_every_check_then_every_step_that_did_not_run():
    checks = [_ok("control-plane", "registrar ready", 4.71), _ok("join", "n1 joined"),
              Check("join", "n2 joined", False, 30.0)]
    rows = summary_rows(checks, ran=["control-plane"])
    assert rows[0] == ("control-plane", "registrar ready", "ok", "4.7")
    assert rows[2] == ("join", "n2 joined", "FAIL", "30.0")
    assert [r[0] for r in rows[3:]] == ALL[2:]  # the failed step has its rows, not a "not run" one
    assert {r[2] for r in rows[3:]} == {"not run"}


def test_a_step_interrupted_before_its_first_check_did_not_run():
    rows = summary_rows([_ok("control-plane")], ran=["control-plane"])
    assert [r[0] for r in rows if r[2] == "not run"] == ALL[1:]


def test_summary_is_a_markdown_table_with_the_verdict_last():
    text = format_summary([_ok(k, f"check of {k}", 2.25) for k in ALL], ran=ALL, total_s=71.4)
    lines = text.splitlines()
    assert lines[0].split("|")[1:-1] == [" step           ", " check                   ", " result ", " seconds "]
    assert set(lines[1]) <= {"|", "-", ":"} and lines[1].endswith(":|")  # seconds right-aligned
    assert len({len(line) for line in lines[:-2]}) == 1  # every row as wide as the header
    assert lines[2] == "| control-plane  | check of control-plane  | ok     |     2.2 |"
    assert lines[-2] == ""
    assert lines[-1] == "10 checks in 10 of 10 steps, 71 s: every check held"


def test_summary_says_what_failed():
    text = format_summary([_ok("control-plane"), Check("join", "n1 joined", False, 30.0)], ran=["control-plane"],
                          total_s=40)
    assert text.splitlines()[-1] == "2 checks in 1 of 10 steps, 40 s: 1 check(s) failed, 8 step(s) not run"
    row = next(line for line in text.splitlines() if line.startswith("| join "))
    assert [c.strip() for c in row.split("|")[1:-1]] == ["join", "n1 joined", "FAIL", "30.0"]


@pytest.mark.parametrize(
    ("check", "line"),
    [
        (Check("join", "n1 joined", True, 2.04), "OK    n1 joined (2.0 s)"),
        (Check("leave", "n4 gone", False, 30.0), "FAIL  n4 gone (30.0 s)"),
    ],
)
def test_format_check(check, line):
    assert format_check(check) == line


def test_peer_counts():
    assert format_peer_counts({"n1": 2, "n2": 0, "n3": None}) == "n1=2 n2=0 n3=-"
    assert expected_peer_counts(["n1", "n2", "n3"]) == {"n1": 2, "n2": 2, "n3": 2}
    assert expected_peer_counts(["n1"]) == {"n1": 0}
    assert expected_peer_counts([]) == {}


def test_every_step_has_its_method_in_the_demo():
    assert all(callable(getattr(Demo, "step_" + key.replace("-", "_"), None)) for key in STEP_KEYS)
