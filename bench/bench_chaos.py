"""Many chaos schedules against fresh labs: faults injected, invariants checked, violations found, time taken.

Each schedule is meshlab.schedule.generate(seed=BASE+i, ...) run by meshlab.chaos.ChaosRun in a lab of its own
(built, driven, removed, leftovers checked), alternating brokers and node counts. A run stops at its first
failing check (the rest of a run after a violation says little); every violation is printed with its evidence
and the schedule is kept in the results file, so any of them can be replayed:

  meshlab chaos --replay results.json        # not the whole file: extract one run's "schedule" first, or
  meshlab chaos --seed SEED --nodes N --broker B --steps K

The issue's full series (200 schedules of 30+ steps at N=6-8 on both brokers) takes hours on this 2-core
machine; --budget stops starting new schedules after that many seconds.

Run as root from the repository:
  .venv/bin/python bench/bench_chaos.py --schedules 200 --steps 30 --nodes 6,8 --broker both --out chaos.json
  .venv/bin/python bench/bench_chaos.py --schedules 12 --steps 30 --nodes 6 --broker both --budget 1500
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshlab.chaos import ChaosRun  # noqa: E402
from meshlab.invariants import INVARIANTS  # noqa: E402
from meshlab.schedule import generate  # noqa: E402
from meshlab.settings import LabSettings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nodes", default="6,8", help="node counts, used in turn (default 6,8)")
    parser.add_argument("--broker", choices=["embedded", "mosquitto", "both"], default="both")
    parser.add_argument("--seed-base", type=int, default=1000)
    parser.add_argument("--budget", type=float, help="start no new schedule after this many seconds")
    parser.add_argument("--out", help="write every run's result (timeline, violations, schedule) as JSON")
    parser.add_argument("--no-probe", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_chaos needs root (network namespaces, wireguard-go)", file=sys.stderr)
        return 2
    brokers = ["embedded", "mosquitto"] if args.broker == "both" else [args.broker]
    counts = [int(n) for n in args.nodes.split(",")]
    start = time.monotonic()
    runs = []
    for i in range(args.schedules):
        if args.budget is not None and time.monotonic() - start > args.budget:
            print(f"budget of {args.budget:.0f} s spent: stopping after {i} schedules", flush=True)
            break
        seed = args.seed_base + i
        broker = brokers[i % len(brokers)]
        nodes = counts[(i // len(brokers)) % len(counts)]
        schedule = generate(seed=seed, nodes=nodes, steps=args.steps, broker=broker)
        settings = LabSettings(lab_dir=Path(tempfile.mkdtemp(prefix="mlb-")))
        result = ChaosRun(settings, schedule, probe=not args.no_probe).run()
        first = result.first_violation()
        print(f"seed {seed} {broker:9} N={nodes} {len(schedule.steps)} steps, {result.checks} checks, "
              f"{result.took_s:5.0f} s: " + ("ok" if result.ok else
                                            f"{first['invariant']} at step {first['step']}: {first['evidence']}"),
              flush=True)
        runs.append({"seed": seed, "broker": broker, "nodes": nodes, **result.to_dict()})
        # Written after every schedule: a series of hours that is stopped early keeps what it ran.
        summary = summarize(runs, elapsed=time.monotonic() - start)
        if args.out:
            Path(args.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    summary = summarize(runs, elapsed=time.monotonic() - start)
    print(json.dumps(summary, indent=2))
    return 0 if all(r["ok"] for r in runs) else 1


def summarize(runs: list[dict], *, elapsed: float) -> dict:
    """Totals over runs: schedules, steps, faults by kind (steps run only), checks, violations by invariant,
    time per schedule."""
    faults: collections.Counter[str] = collections.Counter()
    violations: collections.Counter[str] = collections.Counter()
    for run in runs:
        faults.update(run["faults"])
        violations.update({v["invariant"] for v in run["violations"]})
    took = [run["took_s"] for run in runs]
    return {
        "schedules": len(runs),
        "by_broker": dict(collections.Counter(r["broker"] for r in runs)),
        "by_nodes": dict(collections.Counter(str(r["nodes"]) for r in runs)),
        "seeds": [r["seed"] for r in runs],
        "steps_run": sum(r["steps_run"] for r in runs),
        "faults": dict(sorted(faults.items())),
        "checks": sum(r["checks"] for r in runs),
        "invariants_per_check": len(INVARIANTS) - 1,  # leaks are checked once per run, after down
        "runs_with_violations": sum(1 for r in runs if not r["ok"]),
        "violations_by_invariant": dict(violations),
        "failing_seeds": [(r["seed"], r["broker"], r["nodes"]) for r in runs if not r["ok"]],
        "seconds_per_schedule": {"mean": round(statistics.fmean(took), 1) if took else None,
                                 "min": round(min(took), 1) if took else None,
                                 "max": round(max(took), 1) if took else None},
        "elapsed_s": round(elapsed, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
