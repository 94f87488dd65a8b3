"""Shrinking a failing chaos schedule to a small one that still fails. Pure: the test run is passed in.

A schedule is cut after the step whose check failed and closed (every open fault ended); then whole episodes
(a fault's begin and its end, or a join, or a reinstall) are removed, halves first, then smaller chunks, as in
delta debugging, keeping each removal that still fails. Removing a join removes every episode on the node it
made, and the nodes joined after it are renamed (the lab never reuses a name, so the next join gets the
next one). `fails` runs a candidate (in a fresh lab) and says whether it violates the same invariant; each call
costs a whole run, so `budget` bounds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from meshlab.schedule import CONTROL, ENDS, INSTANT, PROCESS, Schedule, Step, close, replay_model


def _key(step: Step) -> tuple:
    if step.action in CONTROL or step.action in ("registrar-start", "broker-start"):
        begin = step.action if step.action in CONTROL else next(b for b, e in ENDS.items() if e == step.action)
        return ("control", begin)
    if step.action in PROCESS or step.action in ("start", "thaw"):
        return ("process", step.nodes)
    begin = step.action if step.action in ENDS else next(b for b, e in ENDS.items() if e == step.action)
    return (begin, step.nodes)


def episodes(steps: tuple[Step, ...]) -> list[tuple[int, ...]]:
    """Indices of each episode's steps, in the order the episodes begin (a fault never ended is one step)."""
    opened: dict[tuple, int] = {}
    out: list[tuple[int, ...]] = []
    for i, step in enumerate(steps):
        if step.action in INSTANT:
            out.append((i,))
        elif step.action in ENDS:
            opened[_key(step)] = i
        else:
            begin = opened.pop(_key(step), None)
            out.append((i,) if begin is None else (begin, i))
    out += [(i,) for i in opened.values()]
    return sorted(out)


def truncate(schedule: Schedule, last: int) -> Schedule:
    """Steps up to and including index `last`, then the steps that end every fault still open; last one settles."""
    kept = schedule.steps[: last + 1]
    model = replay_model(replace(schedule, steps=kept))
    steps = [*kept, *close(model, interval_s=schedule.interval_s)]
    steps[-1] = replace(steps[-1], settle=True)
    return replace(schedule, steps=tuple(steps))


def without(schedule: Schedule, drop: set[int]) -> Schedule:
    """`schedule` without the episodes numbered in `drop` (and whatever depends on a dropped join)."""
    eps = episodes(schedule.steps)
    drop = set(drop)
    while True:
        lost = {schedule.steps[eps[e][0]].nodes[0] for e in drop if schedule.steps[eps[e][0]].action == "join"}
        more = {e for e, idx in enumerate(eps) if e not in drop
                and any(set(schedule.steps[i].nodes) & lost for i in idx)}
        if not more:
            break
        drop |= more
    removed = {i for e in drop for i in eps[e]}
    steps = [s for i, s in enumerate(schedule.steps) if i not in removed]
    # Joins left get the names the lab will give them: the next free index each time.
    rename, nxt = {}, schedule.nodes + 1
    for step in steps:
        if step.action == "join":
            rename[step.nodes[0]] = f"n{nxt}"
            nxt += 1
    steps = [replace(s, nodes=tuple(rename.get(n, n) for n in s.nodes)) for s in steps]
    if steps:
        steps[-1] = replace(steps[-1], settle=True)
    return replace(schedule, steps=tuple(steps))


def shrink(schedule: Schedule, fails: Callable[[Schedule], bool], *, budget: int,
           report: Callable[[str], None] = lambda _: None) -> Schedule:
    """The smallest schedule found, within `budget` runs, that still `fails` (delta debugging over episodes)."""
    current = schedule
    chunks = 2
    while budget > 0:
        eps = episodes(current.steps)
        if len(eps) <= 1:
            break
        chunks = min(chunks, len(eps))
        size = -(-len(eps) // chunks)
        progressed = False
        for start in range(0, len(eps), size):
            if budget <= 0:
                break
            candidate = without(current, set(range(start, min(start + size, len(eps)))))
            if not candidate.steps or candidate == current:
                continue
            budget -= 1
            report(f"shrink: trying {len(candidate.steps)} steps (removing episodes {start + 1}..{start + size})")
            if fails(candidate):
                current = candidate
                chunks = max(chunks - 1, 2)
                progressed = True
                break
        if not progressed:
            if chunks >= len(eps):
                break
            chunks = min(len(eps), chunks * 2)
    return current
