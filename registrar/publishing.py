"""When the membership stream is published: at once after a quiet spell, batched within a burst.

Pure: no I/O here and no clock read. Every function takes `now` (the writer's monotonic clock) and returns a new
PublishSchedule; the writer publishes when `due()` says so and otherwise waits for its queue until `due_at`.

The rules (docs/registrar.md, "Batching"):
- A change after `window_s` without a publish is published at once (the leading edge): a single join, leave or
  TTL decision reaches the peers without waiting.
- A change that is only a last will (`prompt=False`) waits `will_hold_s` first: if the broker is stopping we
  lose it within milliseconds, and a record published before that would sit unacknowledged in paho, be re-sent
  after the reconnection and briefly contradict the will the registrar takes back then (forgive_offline).
- Changes that come while such a first publish is pending ride along with it.
- Otherwise changes are debounced: published `window_s` after the last one, but at most
  `max(max_delay_s, window_s)` after the first one of the burst. A burst (a fleet registering, a tick marking
  many members unreachable) becomes one delta (and one snapshot), which matters because every delta goes to
  every member: its fan-out grows with the square of the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class PublishPolicy:
    """How publishes are batched; see the module docstring for what each value does."""

    window_s: float
    max_delay_s: float
    will_hold_s: float

    def __post_init__(self) -> None:
        if self.window_s < 0 or self.max_delay_s < 0 or self.will_hold_s < 0:
            raise ValueError("publish window, max delay and will hold must be >= 0")


@dataclass(frozen=True, slots=True)
class PublishSchedule:
    """Where the writer stands: is a publish pending, and when is it due."""

    due_at: float | None = None  # when the pending changes must go out; None: nothing pending
    burst_started_at: float = 0.0  # the first change of the pending burst
    last_published_at: float = float("-inf")
    leading: bool = False  # the pending publish is the first after a quiet window: later changes ride along

    @property
    def pending(self) -> bool:
        return self.due_at is not None


def changed(schedule: PublishSchedule, *, now: float, prompt: bool, policy: PublishPolicy) -> PublishSchedule:
    """A change to publish happened at `now`; `prompt` is False when it is only a last will."""
    if schedule.due_at is None:
        if now - schedule.last_published_at >= policy.window_s:
            due = now if prompt else now + policy.will_hold_s
            return replace(schedule, due_at=due, burst_started_at=now, leading=True)
        schedule = replace(schedule, burst_started_at=now)
    elif schedule.leading:
        return schedule
    cap = schedule.burst_started_at + max(policy.max_delay_s, policy.window_s)
    return replace(schedule, due_at=min(now + policy.window_s, cap))


def due(schedule: PublishSchedule, *, now: float) -> bool:
    """Whether the pending changes must be published now."""
    return schedule.due_at is not None and now >= schedule.due_at


def published(schedule: PublishSchedule, *, now: float) -> PublishSchedule:
    """Everything pending went out at `now` (or was dropped because the broker is away: a reconnection republishes
    everything); the quiet window counts from here."""
    return PublishSchedule(last_published_at=now)
