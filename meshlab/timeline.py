"""A demo/scenario timeline: events stamped relative to the start, formatted for people. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field


def format_event(elapsed_s: float, text: str, *, kind: str = "") -> str:
    """One timeline line: `+  12.345s  [kind] text`, the stamp right-aligned so columns line up."""
    tag = f"[{kind}] " if kind else ""
    return f"+{elapsed_s:8.3f}s  {tag}{text}"


def format_duration(seconds: float) -> str:
    """A short human duration: 850 ms, 3.2 s, 2 min 05 s."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


@dataclass(slots=True)
class Timeline:
    """Events relative to `start` (a monotonic time); `record` returns the formatted line."""

    start: float
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def record(self, now: float, text: str, *, kind: str = "") -> str:
        """Add an event observed at monotonic time `now` and return its line."""
        elapsed = max(0.0, now - self.start)
        self.events.append((elapsed, kind, text))
        return format_event(elapsed, text, kind=kind)

    def lines(self) -> list[str]:
        """Every event, formatted, in the order recorded."""
        return [format_event(t, text, kind=kind) for t, kind, text in self.events]
