"""`meshvpn-registrar mosquitto init`: prepare a Mosquitto to serve this registrar's mesh, once.

Writes into the Mosquitto side (default /etc/mosquitto/meshvpn/): the dynamic security plugin's file with the
registrar's account, the admin account the registrar manages node accounts with, and optionally the observer;
and the registrar's TLS certificate and key, which Mosquitto's TLS listener presents (agents verify it against
the mesh CA pinned by their join token). The registrar's side (its state directory) gets the two passwords.
Nothing per node: nodes enroll with a join token and the registrar creates their accounts at run time. So a
file written again (`--force`) holds no node account, and every node enrolled before can no longer log in:
that needs `--drop-node-accounts` as well when the registrar's state has members.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from registrar import accounts, pki
from registrar.errors import RegistrarError
from registrar.files import write_atomically
from registrar.runner import ADMIN_PASSWORD_FILE, REGISTRAR_PASSWORD_FILE, server_names
from registrar.settings import RegistrarSettings
from registrar.store import SqliteStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Initialized:
    """What `init` wrote; `observer_password` is shown once when an observer account was asked for."""

    directory: Path
    observer_password: str | None


def enrolled_nodes(settings: RegistrarSettings) -> list[str]:
    """The node ids of the registrar's members, from its database (none if it has none yet)."""
    if not settings.db_path.exists():
        return []
    store = SqliteStore(settings.db_path)
    try:
        return sorted(m.node_id for m in store.load().members)
    finally:
        store.close()


def init(
    settings: RegistrarSettings,
    *,
    directory: Path,
    owner: str | None,
    observer: bool,
    force: bool,
    drop_node_accounts: bool = False,
) -> Initialized:
    """Write the Mosquitto side and the registrar's side. Refuses to replace an existing plugin file (the
    passwords in it and in the registrar's state would part) unless `force`; and, when the registrar has
    members, whose accounts the new file would not hold, unless `drop_node_accounts` too."""
    dynsec_file = directory / "dynamic-security.json"
    if dynsec_file.exists() and not force:
        raise RegistrarError(f"{dynsec_file} exists: this Mosquitto is set up already (--force replaces it)")
    if dynsec_file.exists() and not drop_node_accounts:
        nodes = enrolled_nodes(settings)
        if nodes:
            shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
            raise RegistrarError(
                f"{len(nodes)} {'node is' if len(nodes) == 1 else 'nodes are'} enrolled with this registrar "
                f"({shown}), and --force writes "
                f"{dynsec_file} without their broker accounts: none of them could log in to Mosquitto any more. "
                f"They would stay members, go unreachable, and be removed after expiry_s ({settings.expiry_s:g} s). "
                "To bring one back, stop its agent, delete enrollment.json in its state directory and start it "
                "with a valid join token: it enrolls again with its own key and password, and the registrar "
                "creates its account again. Add --drop-node-accounts to replace the file anyway."
            )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    keys = pki.load_or_create(settings.state_dir, mesh=settings.mesh, server_names=server_names(settings))
    registrar_password = secrets.token_urlsafe(24)
    admin_password = secrets.token_urlsafe(24)
    observer_password = secrets.token_urlsafe(24) if observer else None
    config = accounts.initial_config(
        registrar_password=registrar_password, admin_password=admin_password, observer_password=observer_password
    )
    uid = gid = -1
    if owner is not None:
        try:
            uid, gid = pwd.getpwnam(owner).pw_uid, grp.getgrnam(owner).gr_gid
        except KeyError:
            raise RegistrarError(f"no user/group {owner!r} (Mosquitto's; Debian: mosquitto)") from None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o750)
        # Mosquitto saves the plugin's file by writing a new one beside it and renaming: the directory is its.
        os.chown(directory, uid, gid)
        write_atomically(dynsec_file, json.dumps(config, indent=1) + "\n")
        # Mosquitto rewrites this file whenever an account changes: it must own it.
        os.chown(dynsec_file, uid, gid)
        shutil.copyfile(keys.files.server_cert, directory / "server.pem")
        shutil.copyfile(keys.files.server_key, directory / "server.key")
        os.chmod(directory / "server.pem", 0o644)
        os.chmod(directory / "server.key", 0o640)
        os.chown(directory / "server.key", -1, gid)
        write_atomically(settings.state_dir / REGISTRAR_PASSWORD_FILE, registrar_password + "\n")
        write_atomically(settings.state_dir / ADMIN_PASSWORD_FILE, admin_password + "\n")
        # Run as root for a registrar that runs as its own user: what we wrote in its state directory is its own.
        state = settings.state_dir.stat()
        for path in settings.state_dir.iterdir():
            if path.is_file():
                os.chown(path, state.st_uid, state.st_gid)
    except OSError as exc:
        raise RegistrarError(f"cannot prepare {directory}: {exc}") from exc
    log.info("Mosquitto prepared in %s; registrar passwords in %s", directory, settings.state_dir)
    return Initialized(directory, observer_password)
