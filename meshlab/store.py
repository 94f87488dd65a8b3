"""The lab directory on disk: the state file, written atomically under a lock so two shells can drive one lab.

Layout of a lab directory:

    lab.json            the state (meshlab.state.LabState)
    lab.id              the lab id alone, written before anything is created (for `down` after a crash)
    lab.lock            flock(2) target serialising state updates
    control/            registrar state dir (registrar.db, passwords), registrar.log, mosquitto files
    nodes/<name>/       agent state dir (state/), agent.sock, agent.log
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from meshlab import state as state_mod
from meshlab.errors import LabStateError
from meshlab.state import LabState

DEFAULT_LAB_DIR = Path("/var/lib/meshlab")


class LabStore:
    """Reads and writes one lab directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def id_file(self) -> Path:
        return self.root / "lab.id"

    @property
    def control_dir(self) -> Path:
        return self.root / "control"

    def node_dir(self, name: str) -> Path:
        return self.root / "nodes" / name

    def agent_socket(self, name: str) -> Path:
        return self.node_dir(name) / "agent.sock"

    def agent_log(self, name: str) -> Path:
        return self.node_dir(name) / "agent.log"

    def exists(self) -> bool:
        return self.state_file.exists()

    def recorded_id(self) -> str | None:
        """The lab id from lab.id or the state file, even when the state file is damaged."""
        try:
            return self.id_file.read_text().strip() or None
        except OSError:
            return None

    def write_id(self, lab_id: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.id_file.write_text(lab_id + "\n")

    def load(self) -> LabState:
        """The lab's state; LabStateError if there is no lab here or its file cannot be read."""
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            raise LabStateError(f"no lab in {self.root} (run `meshlab up` first)") from None
        except OSError as exc:
            raise LabStateError(f"cannot read {self.state_file}: {exc}") from exc
        try:
            return state_mod.load(text)
        except (ValidationError, ValueError) as exc:
            raise LabStateError(f"damaged state file {self.state_file}: {exc}") from exc

    def save(self, state: LabState) -> None:
        """Replace the state file atomically (write a temporary file, then rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(state_mod.dump(state))
        os.replace(tmp, self.state_file)

    def forget(self) -> None:
        """Remove the state and id files (after `down`); the logs stay for inspection."""
        for path in (self.state_file, self.id_file, self.state_file.with_suffix(".json.tmp")):
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lab lock: one state-changing command at a time per lab directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lab.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
