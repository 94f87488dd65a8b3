"""What every part of a lab works with: its settings, its directory and state file, and the progress report.

Also how the lab finds meshvpn's commands and the environment it starts them in. The parts (control plane,
nodes, observation, traffic, chat) each get one LabContext; none of them holds state of its own between calls,
so any shell can drive a lab another one built.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshlab.errors import LabError
from meshlab.plan import LabPlan
from meshlab.settings import LabSettings
from meshlab.state import LabState, NodeRecord
from meshlab.store import LabStore

Report = Callable[[str], None]
CONTROL_NODE = "ctl"  # the name `exec` and the CLI use for the control namespace


def quiet(_: str) -> None:
    """A Report that says nothing."""


@dataclass(frozen=True, slots=True)
class LabContext:
    """One lab directory, its settings and where progress lines go."""

    settings: LabSettings
    store: LabStore
    report: Report = quiet

    def state(self) -> LabState:
        """The current state file (LabStateError if there is no lab)."""
        return self.store.load()

    def plan(self, state: LabState | None = None) -> LabPlan:
        """Names and addresses of the lab in `state` (default: the state file's)."""
        return LabPlan((state or self.state()).lab_id)

    def node(self, name: str, state: LabState | None = None) -> NodeRecord:
        """The record of node `name` in `state` (default: the state file's); LabError naming the lab's nodes."""
        st = state or self.state()
        try:
            return st.node(name)
        except KeyError:
            names = ", ".join(n.name for n in st.ordered_nodes()) or "none"
            raise LabError(f"no node {name!r} in this lab (nodes: {names})") from None

    def mesh_ip(self, name: str) -> str:
        """The node's mesh IP as last observed; LabError if it never joined."""
        record = self.node(name)
        if record.mesh_ip is None:
            raise LabError(f"{name} has no mesh IP yet")
        return record.mesh_ip


def tool(name: str) -> str:
    """Path of a meshvpn console script: next to this Python first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name} not found next to {sys.executable} or on PATH (run scripts/bootstrap)")
    return found


def child_env() -> dict[str, str]:
    """Environment for the lab's services: ours without MESHVPN_* (the lab passes flags), plus wireguard-go's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHVPN_")}
    env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # Debugging a lab run: MESHLAB_LOG_LEVEL=DEBUG reaches every service the lab starts.
    if os.environ.get("MESHLAB_LOG_LEVEL"):
        env["MESHVPN_LOG_LEVEL"] = os.environ["MESHLAB_LOG_LEVEL"]
    return env


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


# The directory that holds the meshlab package: helpers the lab runs as `python -m meshlab.X` inside a
# namespace start there, so they import from a source checkout as well as from an installed wheel.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
