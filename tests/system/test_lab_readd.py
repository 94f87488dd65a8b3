"""A member that peers removed and added back gets its traffic through even if the keepalive confirming the new
session is lost (found by the chaos bench, docs/chaos.md series 6).

n2 sleeps (freeze) until n1 removes its tunnel, then wakes; n1 adds it back and starts a fresh handshake, while n2
still holds its old session. n1's underlay drops every WireGuard keepalive (a 32-byte message: UDP length 40) for
the test, as a lossy link may drop the one that confirms the new session. Without n1's session-check datagrams
(nodeagent.greeting) everything n2 sent to n1 went on the old keys, dropped by n1, until n2's own timer started
another handshake 15 s later; with them, n2's pings to n1 are answered within a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from netns import lab_missing

from meshlab import system
from meshlab.lab import Lab, new_lab_id
from meshlab.meshview import holders_of
from meshlab.settings import LabSettings
from meshlab.waiting import wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

NODES = ["n1", "n2"]
DEADLINE = 45.0
# n2's pings must be answered this long after n1 holds its tunnel again: the checks go out after 1 s and 3 s;
# WireGuard alone would wait for n2's 15 s timer.
ANSWERED_WITHIN_S = 9.0
TABLE = "meshvpn_test_readd"


def _missing() -> str | None:
    return lab_missing("ip", "wireguard-go", "wg", "ping", "nft", modules=("nodeagent.cli",))


@pytest.fixture(scope="module")
def lab():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    lab_dir = Path(tempfile.mkdtemp(prefix="mlr-"))
    lab = Lab(LabSettings(lab_dir=lab_dir, broker="embedded", heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0,
                          join_timeout_s=DEADLINE), report=lambda line: print(f"[lab] {line}"))  # fmt: skip
    lab_id = new_lab_id()
    try:
        lab.up(len(NODES), lab_id=lab_id)
        yield lab
    finally:
        lab.down(lab_id=lab_id)
        shutil.rmtree(lab_dir, ignore_errors=True)


def _nft(lab: Lab, name: str, script: str, *, check: bool = True) -> None:
    system.run(system.ns_argv(lab.node(name).namespace, ["nft", "-f", "-"]), input_text=script, check=check)


def _pings(lab: Lab, src: str, dst_ip: str) -> bool:
    argv = system.ns_argv(lab.node(src).namespace, ["ping", "-n", "-q", "-c", "1", "-W", "1", dst_ip])
    return subprocess.run(argv, capture_output=True, timeout=15, check=False).returncode == 0


def test_a_member_added_back_reaches_us_when_the_confirming_keepalive_is_lost(lab):
    lab.wait_mesh(NODES, timeout=DEADLINE)
    n1_ip, n2_ip = lab.mesh_ip("n1"), lab.mesh_ip("n2")
    wait_for(lambda: _pings(lab, "n2", n1_ip), timeout=DEADLINE, what="n2 reaching n1 before the test")
    lab.freeze("n2")
    try:
        wait_for(lambda: not holders_of(lab.views(["n1"]), n2_ip, among=["n1"]), timeout=DEADLINE,
                 what="n1 removing the sleeping n2's tunnel")  # fmt: skip
        _nft(lab, "n1", f"table inet {TABLE} {{\n chain out {{\n  type filter hook output priority 0;\n"
                        f"  udp length 40 drop\n }}\n}}\n")  # fmt: skip
    finally:
        lab.thaw("n2")
    try:
        wait_for(lambda: holders_of(lab.views(["n1"]), n2_ip, among=["n1"]), timeout=DEADLINE,
                 what="n1 adding n2 back")  # fmt: skip
        wait_for(lambda: _pings(lab, "n2", n1_ip), timeout=ANSWERED_WITHIN_S,
                 what="n2's pings to n1 answered on the new session")  # fmt: skip
    finally:
        _nft(lab, "n1", f"delete table inet {TABLE}\n", check=False)  # gone with the lab anyway
