"""Laptops that sleep (issue 12): a real lab with a short reservation (the registrar's expiry_s).

- Asleep longer than the TTL but within the reservation: peers drop its tunnel while it sleeps; on waking it comes
  back with the same mesh IP and its own credential — no join token (the lab's token is revoked first).
- Asleep longer than the reservation: the registrar removed it; on waking its agent stops with exit status 4 and
  a message that says to enroll again with a new join token, instead of retrying forever.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from netns import lab_missing

from meshlab import system
from meshlab.lab import Lab, new_lab_id
from meshlab.meshview import holders_of
from meshlab.settings import LabSettings
from meshlab.waiting import wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

NODES = ["n1", "n2", "n3"]
EXPIRY_S = 25.0  # the reservation; TTL is 3 s
DEADLINE = 45.0


def _missing() -> str | None:
    return lab_missing("ip", "wireguard-go", "wg", "ping", modules=("nodeagent.cli",))


@pytest.fixture(scope="module")
def lab():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    lab_dir = Path(tempfile.mkdtemp(prefix="mls-"))
    lab = Lab(LabSettings(lab_dir=lab_dir, broker="embedded", heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0,
                          join_timeout_s=DEADLINE, expiry_s=EXPIRY_S), report=lambda line: print(f"[lab] {line}"))  # fmt: skip
    lab_id = new_lab_id()
    try:
        lab.up(len(NODES), lab_id=lab_id)
        yield lab
    finally:
        lab.down(lab_id=lab_id)
        shutil.rmtree(lab_dir, ignore_errors=True)


def _registrar(lab: Lab, *args: str) -> str:
    """A `meshvpn-registrar` admin command against the lab's registrar (its admin socket); its stdout."""
    argv = [sys.executable, "-m", "registrar.cli", *args, "--state-dir", str(lab.store.control_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_short_sleep_comes_back_with_the_same_ip_and_no_token(lab):
    ip = lab.mesh_ip("n3")
    for line in _registrar(lab, "tokens", "list").splitlines()[1:]:  # no way back in by token any more
        _registrar(lab, "tokens", "revoke", line.split()[0])
    lab.freeze("n3")
    try:
        wait_for(lambda: not holders_of(lab.views(["n1", "n2"]), ip, among=["n1", "n2"]), timeout=DEADLINE,
                 what="peers drop the sleeping node's tunnel")  # fmt: skip
    finally:
        lab.thaw("n3")
    lab.wait_mesh(NODES, timeout=DEADLINE)
    assert lab.mesh_ip("n3") == ip
    assert system.record_state(lab.node("n3").agent) == "running"


def test_sleeping_past_the_reservation_ends_the_agent_with_exit_4(lab):
    node_id = lab.node("n3").node_id
    lab.freeze("n3")
    try:
        wait_for(lambda: node_id not in _registrar(lab, "nodes", "list"), timeout=EXPIRY_S + DEADLINE,
                 what="the registrar removing n3 after its reservation")  # fmt: skip
    finally:
        lab.thaw("n3")
    record = lab.node("n3").agent
    wait_for(lambda: system.record_state(record) == "stopped", timeout=DEADLINE, what="n3's agent stopping")
    log = Path(record.log).read_text()
    assert "enroll it again with a new join token" in log, log[-2000:]
    assert "exiting with status 4" in log, log[-2000:]
