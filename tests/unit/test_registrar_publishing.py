"""The writer's clock rules without a clock: when records and the roster go out (registrar.publishing) and when a
requested liveness tick runs (registrar.ticks). Every case is a table row; times are plain numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registrar import publishing, ticks
from registrar.publishing import PublishPolicy, PublishSchedule

POLICY = PublishPolicy(window_s=0.2, max_delay_s=1.0, will_hold_s=0.1)
QUIET = float("-inf")  # never published yet
W = False  # a change that is only a last will
P = True  # any other change


def run(policy: PublishPolicy, last_published: float, changes: list[tuple[float, bool]]) -> list[float | None]:
    """Feed changes (at, prompt) to a schedule; the due time after each one."""
    schedule = PublishSchedule(last_published_at=last_published)
    due = []
    for at, prompt in changes:
        schedule = publishing.changed(schedule, now=at, prompt=prompt, policy=policy)
        due.append(schedule.due_at)
    return due


@pytest.mark.parametrize(
    ("policy", "last_published", "changes", "due"),
    [
        pytest.param(POLICY, QUIET, [(10.0, P)], [10.0], id="first change ever: at once"),
        pytest.param(POLICY, 9.75, [(10.0, P)], [10.0], id="after a quiet window: at once (leading edge)"),
        pytest.param(POLICY, 9.9, [(10.0, P)], [10.2], id="within the window of the last publish: debounced"),
        pytest.param(
            POLICY, 9.9, [(10.0, P), (10.1, P), (10.25, P)], [10.2, 10.3, 10.45], id="window after the last change"
        ),
        pytest.param(
            POLICY,
            9.9,
            [(10.0 + i / 10, P) for i in range(13)],
            [10.2, 10.3, 10.4, 10.5, 10.6, 10.7, 10.8, 10.9, 11.0, 11.0, 11.0, 11.0, 11.0],
            id="a steady stream: capped at max_delay after the first",
        ),
        pytest.param(
            PublishPolicy(window_s=0.5, max_delay_s=0.2, will_hold_s=0.1),
            9.9,
            [(10.0, P), (10.3, P), (10.6, P)],
            [10.5, 10.5, 10.5],
            id="max_delay below the window: the window is the cap",
        ),
        pytest.param(POLICY, QUIET, [(10.0, W)], [10.1], id="a will after a quiet window waits will_hold"),
        pytest.param(POLICY, QUIET, [(10.0, W), (10.05, P)], [10.1, 10.1], id="a change rides along with a will"),
        pytest.param(POLICY, QUIET, [(10.0, P), (10.0, W)], [10.0, 10.0], id="a will rides along at once"),
        pytest.param(
            POLICY, QUIET, [(10.0, W), (10.05, W), (10.09, P)], [10.1, 10.1, 10.1], id="a pending prompt flush holds"
        ),
        pytest.param(POLICY, 9.9, [(10.0, P), (10.1, W)], [10.2, 10.3], id="a will within a burst is debounced"),
        pytest.param(POLICY, 9.9, [(10.0, W)], [10.2], id="a will within the window waits the window"),
        pytest.param(
            PublishPolicy(window_s=0.0, max_delay_s=0.0, will_hold_s=0.0),
            10.0,
            [(10.0, P), (10.0, W)],
            [10.0, 10.0],
            id="all zero: every change at once",
        ),
    ],
)
def test_publish_schedule(policy, last_published, changes, due):
    assert run(policy, last_published, changes) == pytest.approx(due)


@pytest.mark.parametrize(
    ("due_at", "now", "expected"),
    [(None, 10.0, False), (10.2, 10.1, False), (10.2, 10.2, True), (10.2, 12.0, True)],
)
def test_due(due_at, now, expected):
    assert publishing.due(PublishSchedule(due_at=due_at), now=now) is expected


def test_a_publish_starts_the_quiet_window():
    schedule = publishing.changed(PublishSchedule(), now=10.0, prompt=True, policy=POLICY)
    assert publishing.due(schedule, now=10.0)
    schedule = publishing.published(schedule, now=10.0)
    assert not schedule.pending
    # the next change within the window waits for it; the next after it goes out at once
    assert publishing.changed(schedule, now=10.1, prompt=True, policy=POLICY).due_at == pytest.approx(10.3)
    assert publishing.changed(schedule, now=10.25, prompt=True, policy=POLICY).due_at == pytest.approx(10.25)


def test_policy_rejects_negative_values():
    with pytest.raises(ValueError):
        PublishPolicy(window_s=-1, max_delay_s=1, will_hold_s=0.1)


@given(
    window=st.floats(0, 5),
    max_delay=st.floats(0, 5),
    hold=st.floats(0, 5),
    last=st.floats(-10, 0),
    steps=st.lists(st.tuples(st.floats(0, 2), st.booleans()), min_size=1, max_size=30),
)
def test_a_burst_is_published_in_bounded_time(window, max_delay, hold, last, steps):
    """Whatever the changes: never before the change that made one due, never later than the longest rule."""
    policy = PublishPolicy(window_s=window, max_delay_s=max_delay, will_hold_s=hold)
    schedule = PublishSchedule(last_published_at=last)
    now = 0.0
    for gap, prompt in steps:
        now += gap
        if publishing.due(schedule, now=now):
            schedule = publishing.published(schedule, now=now)
        schedule = publishing.changed(schedule, now=now, prompt=prompt, policy=policy)
        assert schedule.burst_started_at <= schedule.due_at <= schedule.burst_started_at + max(window, max_delay, hold)
        assert schedule.due_at >= schedule.burst_started_at


# ---- ticks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waiting_since", "now", "queue_empty", "expected"),
    [
        pytest.param(10.0, 10.0, True, True, id="nothing queued behind it: at once"),
        pytest.param(10.0, 10.5, False, False, id="messages queued behind it: read them first"),
        pytest.param(10.0, 10.999, False, False, id="just under one interval late: still waits"),
        pytest.param(10.0, 11.0, False, True, id="one interval late under a flood: runs anyway"),
        pytest.param(10.0, 13.0, False, True, id="later still: runs"),
    ],
)
def test_tick_runs_after_what_has_arrived(waiting_since, now, queue_empty, expected):
    assert ticks.run_now(waiting_since, now=now, queue_empty=queue_empty, interval_s=1.0) is expected


@pytest.mark.parametrize(
    ("waiting_since", "at", "expected"),
    [(None, 5.0, 5.0), (5.0, 6.0, 5.0), (6.0, 5.0, 5.0)],
)
def test_a_tick_requested_while_one_waits_merges_into_the_older(waiting_since, at, expected):
    assert ticks.requested(waiting_since, at=at) == expected


@pytest.mark.parametrize(("ttl_s", "interval_s"), [(15.0, 1.0), (5.0, 1.0), (1.0, 0.2), (0.1, 0.05)])
def test_default_tick_interval(ttl_s, interval_s):
    assert ticks.default_interval(ttl_s) == pytest.approx(interval_s)
