"""Looking at a lab until its findings settle: the loop `meshlab check` and the chaos runner share.

A look yields violations (final) and pending findings (allowed until their deadline). The loop looks again
while anything is pending and its deadline has not passed, so a healthy mesh is confirmed in one look and a
converging one as soon as it has converged; a violation found in any look stays reported even if a later look
no longer shows it (a false removal repaired a second later was still a false removal).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshlab.invariants import Bounds, Finding, Memory, check
from meshlab.lab import Lab
from meshlab.snapshot import PairLoss, Snapshot
from meshlab.survey import conditions, look


@dataclass(slots=True)
class Verdict:
    """The outcome of one check: its violations, what was still pending when it stopped, the last snapshot."""

    violations: list[Finding] = field(default_factory=list)
    pending: list[Finding] = field(default_factory=list)
    first_pending: list[Finding] = field(default_factory=list)  # what the first look still waited for
    looks: int = 0
    took_s: float = 0.0
    snapshot: Snapshot | None = None

    @property
    def ok(self) -> bool:
        return not self.violations


def settle(lab: Lab, *, bounds: Bounds, memory: Memory, since: Mapping[str, float] | None = None,
           control_since: float | None = None, traffic: Sequence[PairLoss] = (), probe: bool = True,
           limit_s: float | None = None, interval_s: float = 0.5) -> tuple[Verdict, Memory]:
    """Look until nothing is pending (or `limit_s` has passed); the verdict and the memory for the next check.

    Without `since` (a one-shot check knows no history) every node and the control plane count as changed at
    the first look: the mesh gets its whole bound from then, and not a moment more on later looks.
    """
    start = time.monotonic()
    first_look = time.time()
    if since is None:
        since = {name: first_look for name in conditions(lab)}
    if control_since is None:
        control_since = first_look  # the look itself says None when the control plane is down
    verdict = Verdict()
    seen: dict[tuple[str, str], Finding] = {}
    while True:
        snap = look(lab, since=since, control_since=control_since, traffic=traffic if not verdict.looks else (),
                    probe=probe)
        findings, memory = check(snap, bounds=bounds, memory=memory)
        verdict.looks += 1
        verdict.snapshot = snap
        for f in findings:
            if f.is_violation(snap.now):
                seen.setdefault((f.invariant, f.subject), f)
        verdict.pending = [f for f in findings if not f.is_violation(snap.now)]
        if verdict.looks == 1:
            verdict.first_pending = list(verdict.pending)
        out_of_time = limit_s is not None and time.monotonic() - start >= limit_s
        if not verdict.pending or out_of_time:
            break
        time.sleep(interval_s)
    verdict.violations = list(seen.values())
    verdict.took_s = time.monotonic() - start
    return verdict, memory


def describe(finding: Finding) -> str:
    """One line for people: the invariant, what it is about, the evidence."""
    return f"{finding.invariant} [{finding.subject}]: {finding.evidence}"
