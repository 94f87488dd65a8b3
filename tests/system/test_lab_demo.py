"""`meshlab demo` end to end (what scripts/demo runs after bootstrap): every step runs, every check holds.

The demo builds its own lab (registrar with the embedded broker, n1..n4 with wireguard-go, n2 behind a NAT
router) in a temporary directory, with a lab id of ours so the test can look for anything it left. Its exit
status is the verdict; the summary table must list every step of meshlab.demosteps.STEPS, each check ok. A
second run is interrupted with SIGTERM once its first node has joined: it must exit 130, list the steps it did
not run and remove its lab all the same. Root, namespaces and wireguard-go are needed; skipped with the reason
otherwise.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from netns import lab_missing

from meshlab.context import tool
from meshlab.demosteps import STEP_KEYS
from meshlab.errors import LabError, LabStateError
from meshlab.lab import new_lab_id
from meshlab.snapshot import Leftovers
from meshlab.store import LabStore
from meshlab.survey import leftovers
from meshlab.waiting import wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
DEMO_DEADLINE = 240.0  # about 70 s on an idle 2-core machine; room for one running other test suites
JOIN_DEADLINE = 60.0
EXIT_DEADLINE = 60.0  # an interrupted demo removes its lab before it exits


def _missing() -> str | None:
    reason = lab_missing("ip", "nft", "wireguard-go", "wg", "ping", modules=("registrar.cli", "nodeagent.cli", "desktop_chat.cli"))
    if reason:
        return reason
    try:
        tool("meshchat")
    except LabError as exc:  # the console script is not installed in this environment
        return str(exc)
    return None


@pytest.fixture
def demo_dir(tmp_path_factory):
    reason = _missing()
    if reason:
        print(f"skipping the demo test: {reason}")
        pytest.skip(reason)
    # Short: agent sockets live in the lab directory and unix socket paths are limited.
    path = tmp_path_factory.mktemp("demo")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _argv(lab_dir: Path, lab_id: str) -> list[str]:
    return [sys.executable, "-m", "meshlab.cli", "--lab-dir", str(lab_dir), "demo", "--id", lab_id]


def _summary(text: str) -> list[list[str]]:
    """The summary table's rows (step, check, result, seconds), header and rule left out."""
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ") and line.endswith(" |")]
    assert rows and rows[0] == ["step", "check", "result", "seconds"], text[-3000:]
    return rows[1:]


def _steps_in_order(rows: list[list[str]]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row[0] not in seen:
            seen.append(row[0])
    return seen


def test_the_demo_runs_every_step_and_every_check_holds(demo_dir):
    lab_id = new_lab_id()
    try:
        proc = subprocess.run(_argv(demo_dir, lab_id), cwd=REPO, capture_output=True, text=True,
                              timeout=DEMO_DEADLINE, check=False)
    finally:
        left = leftovers(lab_id, demo_dir)
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = _summary(proc.stdout)
    assert _steps_in_order(rows) == list(STEP_KEYS)
    assert [r for r in rows if r[2] != "ok"] == []
    assert proc.stdout.rstrip().endswith("every check held")
    assert left == Leftovers()


def test_an_interrupted_demo_removes_its_lab(demo_dir):
    lab_id = new_lab_id()
    store = LabStore(demo_dir)

    def first_node_joined() -> bool:
        try:
            return any(n.mesh_ip for n in store.load().nodes.values())
        except LabStateError:  # not made yet
            return False

    proc = subprocess.Popen(_argv(demo_dir, lab_id), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: first_node_joined() or proc.poll() is not None, timeout=JOIN_DEADLINE,
                 what="the demo's first node joins")
        assert proc.poll() is None, "the demo ended before it was interrupted"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=EXIT_DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(out[-4000:])
    assert proc.returncode == 130
    rows = _summary(out)
    assert rows[-1][0] == STEP_KEYS[-1] and rows[-1][2] == "not run"
    assert leftovers(lab_id, demo_dir) == Leftovers()
