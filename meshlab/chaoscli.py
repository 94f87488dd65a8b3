"""`meshlab chaos` from the command line: pick or replay a schedule, run it, write the result, shrink a failure.

A lab already in the lab directory is driven as it is (its nodes, broker and heartbeat); otherwise the run
builds a lab for the schedule and removes it at the end. The exit status is the number of violations.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from meshlab.chaos import ChaosRun, load_schedule, shrink_failure
from meshlab.chaosreport import regression_name, regression_record
from meshlab.errors import LabError
from meshlab.lab import Lab
from meshlab.schedule import Schedule, generate
from meshlab.settings import LabSettings

DEFAULT_STEPS = 20
DEFAULT_SHRINK_RUNS = 6  # each a whole run in a fresh lab: about a minute each at 4 nodes
OPEN_ENDED_STEPS = 10_000  # --duration: a schedule longer than any run, cut short and closed when time is up


def pick_schedule(lab: Lab, settings: LabSettings, args: argparse.Namespace) -> tuple[Schedule, bool]:
    """The schedule to run and whether the run builds its own lab."""
    existing = lab.store.exists()
    if args.replay:
        if existing:
            raise LabError("--replay builds a lab of its own: run it with another --lab-dir or `meshlab down` first")
        return load_schedule(Path(args.replay)), True
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    steps = OPEN_ENDED_STEPS if args.duration else (args.steps or DEFAULT_STEPS)
    if existing:
        st = lab.state()
        schedule = generate(seed=seed, nodes=len(st.nodes), steps=steps, broker=st.broker,
                            interval_s=st.heartbeat_interval_s, ttl_s=st.heartbeat_ttl_s)
        return schedule, False
    schedule = generate(seed=seed, nodes=args.nodes, steps=steps, broker=settings.broker,
                        interval_s=settings.heartbeat_interval_s, ttl_s=settings.heartbeat_ttl_s)
    return schedule, True


def run_chaos(lab: Lab, settings: LabSettings, args: argparse.Namespace, *, say: Callable[[str], None]) -> int:
    if os.geteuid() != 0:
        raise LabError("meshlab chaos needs root (network namespaces, wireguard-go)")
    schedule, build = pick_schedule(lab, settings, args)
    say(f"chaos: seed {schedule.seed}, {len(schedule.steps)} steps on {schedule.nodes} nodes "
        f"({schedule.broker} broker); stable nodes {', '.join(schedule.stable)}"
        + ("" if build else f"; driving the lab in {settings.lab_dir}"))
    run = ChaosRun(settings, schedule, report=say, build=build, keep_going=args.keep_going,
                   probe=not args.no_probe, duration_s=args.duration, lab_report=say if args.verbose else _quiet)
    result = run.run()
    for v in result.violations:
        say(f"VIOLATION at step {v['step']}: {v['invariant']} [{v['subject']}]: {v['evidence']}")
        for source, lines in v["logs"].items():
            if lines:
                say(f"  --- {source} log around it ---")
                for line in lines[-12:]:
                    say(f"  {line}")
    out = result.to_dict()
    shrink_runs = args.shrink if args.shrink is not None else DEFAULT_SHRINK_RUNS
    if not result.ok and shrink_runs and build:
        small = shrink_failure(run.settings, result.schedule, result, runs=shrink_runs, report=say)
        first = result.first_violation() or {}
        folder = Path(args.regressions) if args.regressions else settings.lab_dir / "regressions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / regression_name(small, first.get("invariant", "violation"))
        record = regression_record(small, invariant=first.get("invariant", ""), evidence=first.get("evidence", ""),
                                   found_with={"seed": schedule.seed, "broker": schedule.broker,
                                               "nodes": schedule.nodes, "steps": len(schedule.steps)})
        path.write_text(json.dumps(record, indent=2) + "\n")
        out["shrunk"] = {"file": str(path), "steps": len(small.steps)}
        say(f"shrunk to {len(small.steps)} steps: {path} (replay: meshlab chaos --replay {path})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        say(f"timeline and results written to {args.json}")
    say(f"chaos: {'no violation' if result.ok else f'{len(result.violations)} violation(s)'} in "
        f"{result.steps_run} steps, {result.checks} checks, {result.took_s:.0f} s (seed {schedule.seed})")
    return min(len(result.violations), 125)


def _quiet(_: str) -> None:
    pass
