"""The registrar benchmark runs as docs/benchmarks.md says (`python bench/bench_registrar.py`), on the current
contract: nodes enroll, log in with their own passwords, register, and follow the signed snapshot and deltas."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed (apt-get install mosquitto)")
def test_documented_command_converges_on_the_current_contract(tmp_path: Path) -> None:
    # Without PYTHONPATH: the script must use the packages of its own checkout, as run from one.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "bench/bench_registrar.py", "--nodes", "6", "--workers", "2", "--broker", "mosquitto",
         "--heartbeat-window", "0.5", "--timeout", "60", "--json", str(tmp_path / "figures.json")],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["all_complete"] and result["signatures_checked"], result
    assert result["nodes"] == 6 and result["registrar_committed_all_s"] is not None, result
    written = json.loads((tmp_path / "figures.json").read_text())
    assert written == result and written["full_roster_s"] is not None and written["registrar_cpu_pct"] >= 0


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed (apt-get install mosquitto)")
@pytest.mark.parametrize(
    ("mode", "extra", "check"),
    [
        ("churn", ["--rounds", "2"], lambda r: r["join_samples"] == 2 * 6 and r["leave_samples"] == 2 * 5),
        # A sample of 3 full agents timed among 3 light nodes; a leaver does not time its own leave.
        ("churn", ["--rounds", "2", "--sample", "3"], lambda r: r["agents"] == 3 and r["light_nodes"] == 3
         and r["join_samples"] == 2 * 3 and r["leave_samples"] == 2 * 2 and r["light_connections_closed"] == 0),
        ("heartbeats", ["--heartbeat-window", "2"], lambda r: r["heartbeats_sent_per_s"] > 0
         and r["received_of_sent"] > 0.5 and r["connections_closed"] == 0),
    ],
)  # fmt: skip
def test_the_churn_and_heartbeat_modes_run_on_a_seeded_mesh(tmp_path: Path, mode, extra, check) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "bench/bench_registrar.py", "--mode", mode, "--nodes", "6", "--workers", "2", "--broker",
         "mosquitto", "--timeout", "60", *extra],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["mode"] == mode and result["nodes"] == 6 and check(result), result
