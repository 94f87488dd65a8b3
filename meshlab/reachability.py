"""The reachability matrix: which ordered pairs of nodes reach each other over mesh IPs, and how soon.

No I/O here: the probes (ping, TCP echo), the clock, the pause between rounds and the way a round's probes
run (one by one or side by side) are passed in. Lab.reachability passes the lab's own, for tests and
benchmarks alike. Each round probes every pair not yet answered, once per probe kind; a
pair's time is when its first answer came, from the start of the measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

Probe = Callable[[str, str], bool]  # (src, dst) -> answered
Pair = tuple[str, str]


def sequential(calls: Sequence[Callable[[], bool]]) -> list[bool]:
    """Run a round's probes one after the other."""
    return [call() for call in calls]


@dataclass(slots=True)
class ReachMatrix:
    """Per probe kind ("ping", "tcp"), per ordered pair: seconds until the first answer, None if none came."""

    names: list[str]
    timeout_s: float
    first_s: dict[str, dict[Pair, float | None]] = field(default_factory=dict)
    rounds: int = 0

    def pairs(self) -> list[Pair]:
        return [(a, b) for a in self.names for b in self.names if a != b]

    def failures(self) -> list[str]:
        """Every pair and kind that never answered, e.g. "ping n2->n3"; empty when the matrix is complete."""
        return [f"{kind} {a}->{b}" for kind, times in self.first_s.items() for (a, b) in self.pairs()
                if times.get((a, b)) is None]

    def ok(self) -> bool:
        return not self.failures()

    def slowest_s(self) -> float | None:
        """The latest first answer of any pair and kind; None if nothing answered."""
        times = [t for per_kind in self.first_s.values() for t in per_kind.values() if t is not None]
        return max(times, default=None)

    def answered(self, kind: str) -> dict[Pair, bool]:
        """For report.format_matrix: pair -> answered."""
        return {pair: t is not None for pair, t in self.first_s.get(kind, {}).items()}

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly: {"names", "timeout_s", "rounds", kind: {"src->dst": seconds or None}}."""
        out: dict[str, object] = {"names": self.names, "timeout_s": self.timeout_s, "rounds": self.rounds}
        for kind, times in self.first_s.items():
            out[kind] = {f"{a}->{b}": None if t is None else round(t, 3) for (a, b), t in times.items()}
        return out


def measure(names: Sequence[str], *, probes: Mapping[str, Probe], timeout_s: float, now: Callable[[], float],
            sleep: Callable[[float], None], run_all: Callable[[Sequence[Callable[[], bool]]], list[bool]] = sequential,
            interval_s: float = 0.2) -> ReachMatrix:
    """Probe every ordered pair of `names` with every probe, in rounds, until all answered or `timeout_s` passed.

    A round always runs at least once, so `timeout_s=0` is a single look (the `meshlab ping` matrix).
    """
    matrix = ReachMatrix(names=list(names), timeout_s=timeout_s)
    matrix.first_s = {kind: dict.fromkeys(matrix.pairs()) for kind in probes}
    start = now()
    while True:
        pending = [(kind, pair) for kind, times in matrix.first_s.items() for pair, t in times.items() if t is None]
        if not pending or (matrix.rounds and now() - start > timeout_s):
            return matrix
        if matrix.rounds:
            sleep(interval_s)
        calls = [lambda k=kind, p=pair: probes[k](*p) for kind, pair in pending]
        answers = run_all(calls)
        matrix.rounds += 1
        done_at = now() - start
        for (kind, pair), answered in zip(pending, answers, strict=True):
            if answered:
                matrix.first_s[kind][pair] = done_at
