"""The reachability matrix: rounds of probes over every ordered pair, with a fake clock and fake probes."""

import pytest

from meshlab.reachability import measure


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def _probe(clock: FakeClock, answers_from: dict[tuple[str, str], float], *, cost_s: float = 1.0):
    """A probe that costs `cost_s` of fake time and answers once the clock reaches the pair's time (never if absent)."""
    calls: list[tuple[str, str]] = []

    def probe(src: str, dst: str) -> bool:
        calls.append((src, dst))
        clock.t += cost_s
        at = answers_from.get((src, dst))
        return at is not None and clock.t - 100.0 >= at

    probe.calls = calls
    return probe


def test_everything_answers_at_once_one_round():
    clock = FakeClock()
    ping = _probe(clock, {(a, b): 0 for a in "ab" for b in "ab"}, cost_s=0.5)
    m = measure(["a", "b"], probes={"ping": ping}, timeout_s=10, now=clock.now, sleep=clock.sleep)
    assert m.ok() and m.rounds == 1
    assert m.first_s["ping"] == {("a", "b"): 1.0, ("b", "a"): 1.0}  # answered when the round ended
    assert m.answered("ping") == {("a", "b"): True, ("b", "a"): True}


def test_answered_pairs_are_not_probed_again():
    clock = FakeClock()
    ping = _probe(clock, {("a", "b"): 0, ("b", "a"): 3})
    m = measure(["a", "b"], probes={"ping": ping}, timeout_s=30, now=clock.now, sleep=clock.sleep)
    assert m.ok()
    assert ping.calls.count(("a", "b")) == 1 and ping.calls.count(("b", "a")) == 2
    assert m.first_s["ping"][("b", "a")] == pytest.approx(3.2)  # 2 probes of 1 s, one pause of 0.2 s


def test_a_pair_that_never_answers_fails_at_the_deadline():
    clock = FakeClock()
    ping = _probe(clock, {("a", "b"): 0})
    tcp = _probe(clock, {("a", "b"): 0, ("b", "a"): 0})
    m = measure(["a", "b"], probes={"ping": ping, "tcp": tcp}, timeout_s=5, now=clock.now, sleep=clock.sleep)
    assert not m.ok()
    assert m.failures() == ["ping b->a"]
    assert m.first_s["tcp"][("b", "a")] is not None
    assert clock.t - 100 <= 5 + 1.2 + 2  # at most one round started after the deadline minus its pause
    assert m.as_dict()["ping"] == {"a->b": 4.0, "b->a": None}  # stamped when its round (4 probes) ended


def test_zero_timeout_is_a_single_look():
    clock = FakeClock()
    ping = _probe(clock, {})
    m = measure(["a", "b", "c"], probes={"ping": ping}, timeout_s=0, now=clock.now, sleep=clock.sleep)
    assert m.rounds == 1 and len(ping.calls) == 6 and len(m.failures()) == 6
    assert m.slowest_s() is None


def test_rounds_can_run_side_by_side():
    clock = FakeClock()
    ping = _probe(clock, {("a", "b"): 0, ("b", "a"): 0})
    batches: list[int] = []

    def run_all(calls):
        batches.append(len(calls))
        return [call() for call in calls]

    m = measure(["a", "b"], probes={"ping": ping}, timeout_s=5, now=clock.now, sleep=clock.sleep, run_all=run_all)
    assert m.ok() and batches == [2]
