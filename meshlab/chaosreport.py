"""What a chaos run tells people and files: timeline lines, the log lines around a violation, the regression
file a shrunk failure is saved as. No I/O here."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from meshlab.invariants import Finding
from meshlab.schedule import Schedule
from meshlab.timeline import format_event

_STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) ")
_NODE = re.compile(r"\bn\d{1,3}\b")


def lines_between(text: str, *, start: float, end: float, limit: int = 40) -> list[str]:
    """The log lines stamped (HH:MM:SS.mmm, local time, as meshcontract.logs prints) between two unix times.

    Lines without a stamp (a traceback's) go with the stamped line before them. Stamps carry no date: a line
    is placed on the day of `end`, or the day before when that would put it after `end` (a run past midnight).
    """
    day = time.localtime(end)
    midnight = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0, 0, 0, -1))
    out: list[str] = []
    keep = False
    for line in text.splitlines():
        match = _STAMP.match(line)
        if match:
            h, m, s, ms = (int(g) for g in match.groups())
            at = midnight + h * 3600 + m * 60 + s + ms / 1000
            if at > end + 1:
                at -= 86400
            keep = start <= at <= end
        if keep:
            out.append(line)
    return out[-limit:]


def nodes_named(findings: Iterable[Finding]) -> list[str]:
    """The lab node names a finding's subject or evidence mentions, in index order."""
    names = {n for f in findings for n in _NODE.findall(f"{f.subject} {f.evidence}")}
    return sorted(names, key=lambda n: int(n[1:]))


def event_line(elapsed_s: float, kind: str, text: str) -> str:
    """One timeline line (meshlab.timeline's format)."""
    return format_event(elapsed_s, text, kind=kind)


def regression_record(schedule: Schedule, *, invariant: str, evidence: str, found_with: dict,
                      xfail: str | None = None) -> dict:
    """The content of a regression file: the shrunk schedule, what it violated, and whether it is a known bug
    (`xfail`: the reason; the replaying test is then xfail(strict=True), so it flips when the bug is fixed)."""
    return {"invariant": invariant, "evidence": evidence, "found_with": found_with, "xfail": xfail,
            "schedule": schedule.to_dict()}


def regression_name(schedule: Schedule, invariant: str) -> str:
    """A file name for a regression: the invariant, the broker and the seed it was found with."""
    seed = "replay" if schedule.seed is None else f"seed{schedule.seed}"
    return f"{invariant}-{schedule.broker}-{seed}.json"
