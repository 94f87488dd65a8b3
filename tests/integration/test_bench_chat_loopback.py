"""The chat benchmark runs as docs/benchmarks.md says (`python bench/bench_chat_loopback.py`), for both stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("history", ["memory", "sqlite"])
def test_documented_command_reports_latency(history: str) -> None:
    # Without PYTHONPATH: the script must find the packages from its own location, as run from a checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "bench/bench_chat_loopback.py", "--messages", "5", "--history", history],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"5 messages, {history} history: median "), proc.stdout
