"""`meshlab down` cleans up everything a lab made, also when its state file is lost, and is harmless repeated."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from meshlab.errors import LabError
from meshlab.lab import Lab, new_lab_id
from meshlab.settings import LabSettings
from meshlab.snapshot import Leftovers
from meshlab.survey import leftovers

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, wireguard-go)"
    for binary in ("ip", "ss", "wireguard-go", "wg"):
        if shutil.which(binary) is None:
            return f"{binary} not installed"
    for module in ("registrar.cli", "nodeagent.cli"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not available"
    return None



@pytest.mark.parametrize("damage", ["state file deleted", "state file garbage, id given on the command line"])
def test_down_after_losing_the_state(damage):
    reason = _skip_reason()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    lab_id = new_lab_id()
    # Short on purpose: agent sockets live in the lab directory and unix socket paths are limited.
    lab_dir = Path(tempfile.mkdtemp(prefix="mld-"))
    lab = Lab(LabSettings(lab_dir=lab_dir))
    try:
        lab.up(1, lab_id=lab_id)
        assert leftovers(lab_id, lab_dir) != Leftovers(), "the lab should exist"
        if damage == "state file deleted":
            lab.store.state_file.unlink()
            lab.down()
        else:
            lab.store.state_file.write_text("{not json")
            lab.store.id_file.unlink()
            lab.down(lab_id=lab_id)
        assert leftovers(lab_id, lab_dir) == Leftovers()
        assert lab.down() == []  # again: nothing left, no error
    finally:
        lab.down(lab_id=lab_id)
        shutil.rmtree(lab_dir, ignore_errors=True)


def test_too_long_lab_dir_is_refused_before_anything_is_made(tmp_path):
    lab = Lab(LabSettings(lab_dir=tmp_path / ("x" * 90)))
    with pytest.raises(LabError, match="too long"):
        lab.up(1)
    assert not lab.store.recorded_id()
