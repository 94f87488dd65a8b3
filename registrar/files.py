"""Writing the registrar's secret files: atomically, 0600, never half written."""

from __future__ import annotations

import os
from pathlib import Path

from registrar.errors import CredentialsError


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` (mode 0600) so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise CredentialsError(f"cannot write password file {path}: {exc}") from exc
