"""Convergence times of a real 4-node lab (wireguard-go, embedded broker, heartbeat 1 s, TTL 3 s).

Measures, over a few runs each, with p50/p95:
  join->reachable   `add` started -> the new node pings and is pinged by every other node
  sigkill->removed  agent SIGKILLed -> no other node holds a tunnel to it (last will / TTL)
  freeze->removed   node SIGSTOPped -> no other node holds a tunnel to it (TTL only)
  leave->removed    agent SIGTERMed (graceful) -> no other node holds a tunnel to it
  restart->complete agent started again after a crash -> the mesh of all nodes is complete

Run as root from the repository:  .venv/bin/python bench/bench_lab.py [--runs 5] [--nodes 4]
Times are from the lab's side: they include polling (`wg show` in each namespace every 50 ms).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from meshlab.lab import Lab, new_lab_id, wait_for
from meshlab.meshview import holders_of
from meshlab.settings import LabSettings

POLL = 0.05


def _removed(lab: Lab, ip: str, others: list[str]) -> float:
    return wait_for("removed", lambda: not holders_of(lab.views(others), ip, among=others), timeout=60,
                    interval=POLL)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _one_run(lab: Lab, results: dict[str, list[float]]) -> None:
    """One round: a fresh node joins, is killed, frozen, crashed and restarted, then leaves."""
    # join: measured until every pair with the new node answers ping
    start = time.monotonic()
    victim = lab.add().name
    others = [n for n in lab.running_nodes() if n != victim]
    wait_for("reachable", lambda: all(lab.ping(o, victim, wait_s=0.5) and lab.ping(victim, o, wait_s=0.5)
                                      for o in others), timeout=60, interval=POLL)
    results["join->reachable"].append(time.monotonic() - start)
    ip = lab.mesh_ip(victim)

    lab.kill(victim)
    results["sigkill->removed"].append(_removed(lab, ip, others))
    lab.start(victim, wait=False)
    lab.wait_mesh(timeout=60)

    lab.freeze(victim)
    results["freeze->removed"].append(_removed(lab, ip, others))
    lab.thaw(victim)
    lab.wait_mesh(timeout=60)

    lab.crash(victim)
    _removed(lab, ip, others)
    start = time.monotonic()
    lab.start(victim, wait=False)
    wait_for("complete", lambda: not lab.mesh_problems([*others, victim]), timeout=60, interval=POLL)
    results["restart->complete"].append(time.monotonic() - start)

    start = time.monotonic()
    lab.stop(victim)
    _removed(lab, ip, others)
    results["leave->removed"].append(time.monotonic() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--lab-dir", type=Path)
    args = parser.parse_args()
    lab_dir = args.lab_dir or Path(tempfile.mkdtemp(prefix="meshlab-bench."))
    settings = LabSettings(lab_dir=lab_dir, heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)
    lab = Lab(settings)
    results: dict[str, list[float]] = {k: [] for k in
                                       ("join->reachable", "sigkill->removed", "freeze->removed",
                                        "leave->removed", "restart->complete")}
    try:
        lab.up(args.nodes - 1, lab_id=new_lab_id())
        lab.wait_mesh(timeout=60)
        for run in range(args.runs):
            _one_run(lab, results)
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()),
                  flush=True)
    finally:
        lab.down()
    print(f"\nN={args.nodes}, heartbeat 1 s, TTL 3 s, {args.runs} runs\n")
    print("| measure | p50 (s) | p95 (s) | min | max |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in results.items():
        if values:
            print(f"| {name} | {statistics.median(values):.2f} | {_percentile(values, 0.95):.2f} | "
                  f"{min(values):.2f} | {max(values):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
