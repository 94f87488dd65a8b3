"""Nodes' broker accounts: created when a node enrolls, deleted (and its session cut) when it is removed.

`BrokerAccounts` is the small interface the registrar's writer uses; three implementations behind it:
  - DynsecAccounts: Mosquitto's dynamic security plugin, changed at run time over its control topic. Each node
    gets a client plus a role of its own with literal topics (2.0.11 substitutes no %u in dynsec ACLs), and a
    role shared by the mesh's nodes; both built from meshcontract.access.GRANTS, the rules the embedded broker
    enforces too.
  - PasswordFileAccounts: the embedded broker's Mosquitto-format password file, plus a hook that drops a
    removed node's live session.
  - MemoryAccounts: the same contract in memory (tests).
`reconcile` deletes accounts of nodes that are not members (a crash between creating the account and committing
the enrollment leaves one), so no credential outlives its membership.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from meshcontract import access, topics
from meshcontract.access import GRANTS, Role
from registrar import dynsec
from registrar.errors import CredentialsError
from registrar.files import write_atomically

log = logging.getLogger(__name__)


class BrokerAccounts(Protocol):
    """The broker's node accounts (username = node id)."""

    def ensure(self, accounts: Mapping[str, str]) -> None:
        """Create each node's account with its password (or set the password if it exists)."""

    def remove(self, node_ids: Iterable[str]) -> None:
        """Delete these nodes' accounts and disconnect their sessions; unknown ones are ignored."""

    def names(self) -> set[str]:
        """The node accounts that exist (reserved accounts such as the registrar's are not listed)."""

    def set_service_account(self, username: str, password: str) -> None:
        """Create or re-password the registrar's or the observer's account (meshcontract.access.Role)."""

    def wait_ready(self, timeout: float) -> bool:
        """True once the accounts can be read and changed (Mosquitto: the admin's connection is up), False if
        that took longer than `timeout` seconds."""


def reconcile(accounts: BrokerAccounts, members: Iterable[str]) -> list[str]:
    """Delete node accounts that belong to no member; returns their names."""
    orphans = sorted(accounts.names() - set(members))
    if orphans:
        accounts.remove(orphans)
        log.warning("deleted %d broker accounts without a member: %s", len(orphans), ", ".join(orphans[:10]))
    return orphans


class MemoryAccounts:
    """Accounts in memory: passwords in clear (tests inspect them), removals recorded."""

    def __init__(self) -> None:
        self.passwords: dict[str, str] = {}
        self.removed: list[str] = []

    def ensure(self, accounts: Mapping[str, str]) -> None:
        self.passwords.update(accounts)

    def remove(self, node_ids: Iterable[str]) -> None:
        for node in node_ids:
            if self.passwords.pop(node, None) is not None:
                self.removed.append(node)

    def names(self) -> set[str]:
        return {u for u in self.passwords if access.role_of(u) is Role.NODE}

    def set_service_account(self, username: str, password: str) -> None:
        self.passwords[username] = password

    def wait_ready(self, timeout: float) -> bool:
        return True


class PasswordFileAccounts:
    """The password file the embedded broker reads at every CONNECT; `disconnect` drops a live session."""

    def __init__(self, path: Path, *, disconnect: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self._disconnect = disconnect
        self._lock = threading.Lock()

    def _entries(self) -> dict[str, str]:
        try:
            return access.parse_password_file(self.path.read_text())
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CredentialsError(f"cannot read password file {self.path}: {exc}") from exc

    def ensure(self, accounts: Mapping[str, str]) -> None:
        if not accounts:
            return
        with self._lock:
            entries = self._entries()
            for node, password in accounts.items():
                entries[node] = access.hash_password(password)
            write_atomically(self.path, access.render_password_file(entries))

    def remove(self, node_ids: Iterable[str]) -> None:
        node_ids = list(node_ids)
        with self._lock:
            entries = self._entries()
            gone = [n for n in node_ids if entries.pop(n, None) is not None]
            if gone:
                write_atomically(self.path, access.render_password_file(entries))
        for node in node_ids:
            if self._disconnect is not None:
                self._disconnect(node)

    def names(self) -> set[str]:
        with self._lock:
            return {user for user in self._entries() if access.role_of(user) is Role.NODE}

    def set_service_account(self, username: str, password: str) -> None:
        _service_role(username)
        self.ensure({username: password})

    def wait_ready(self, timeout: float) -> bool:
        return True


# -- Mosquitto dynamic security ------------------------------------------------------------------------------


def _node_role_name(mesh: str, node_id: str) -> str:
    return f"meshvpn.{mesh}.node.{node_id}"


def mesh_node_role_name(mesh: str) -> str:
    return f"meshvpn.{mesh}.nodes"


def _read_acls(topic: str, *, pattern: bool) -> list[dict]:
    return [
        dynsec.acl("subscribePattern" if pattern else "subscribeLiteral", topic),
        dynsec.acl("publishClientReceive", topic),
    ]


def node_role(mesh: str, node_id: str) -> dynsec.Role:
    """What only this node may do: its own register/status/heartbeat topics, its own replies."""
    acls = []
    for grant in GRANTS[Role.NODE]:
        if not grant.own:
            continue
        topic = topics.build(mesh, grant.kind, node_id)
        if grant.publish:
            acls.append(dynsec.acl("publishClientSend", topic))
        if grant.read:
            acls += _read_acls(topic, pattern=False)
    return dynsec.Role(_node_role_name(mesh, node_id), tuple(acls))


def mesh_node_role(mesh: str) -> dynsec.Role:
    """What every node of `mesh` may do: read the membership stream and the registrar's status."""
    acls = []
    for grant in GRANTS[Role.NODE]:
        if grant.own:
            continue
        node = "+" if grant.kind in topics.PER_NODE else None
        topic = topics.build(mesh, grant.kind, node) if node is None else f"{topics.subscription(mesh, grant.kind)}"
        acls += _read_acls(topic, pattern=node is not None)
    return dynsec.Role(mesh_node_role_name(mesh), tuple(acls))


def observer_role() -> dynsec.Role:
    """The observer (mosquitto_sub): subscribe anywhere under meshvpn/, receive only what GRANTS lets it read."""
    acls = [dynsec.acl("subscribePattern", f"{topics.ROOT}/#")]
    for grant in GRANTS[Role.OBSERVER]:
        suffix = "/+" if grant.kind in topics.PER_NODE else ""
        acls.append(dynsec.acl("publishClientReceive", f"{topics.ROOT}/{topics.VERSION}/+/{grant.kind}{suffix}"))
    return dynsec.Role("meshvpn.observer", tuple(acls))


def registrar_role() -> dynsec.Role:
    """The registrar: everything under meshvpn/."""
    root = f"{topics.ROOT}/#"
    return dynsec.Role(
        "meshvpn.registrar",
        (
            dynsec.acl("publishClientSend", root),
            dynsec.acl("publishClientReceive", root),
            dynsec.acl("subscribePattern", root),
        ),
    )


def initial_config(
    *,
    registrar_password: str | None,
    admin_password: str,
    observer_password: str | None,
    mesh: str | None = None,
    nodes: Mapping[str, str] | None = None,
) -> dict:
    """A dynamic security config file for a new Mosquitto: the registrar, the admin it uses to manage node
    accounts, and (optionally) the observer and ready-made node accounts of `mesh`; no anonymous access."""
    roles = [registrar_role(), observer_role(), dynsec.admin_role()]
    clients = [dynsec.client_config(access.BROKER_ADMIN_USER, admin_password, ["dynsec-admin"])]
    if registrar_password is not None:
        clients.append(dynsec.client_config(access.REGISTRAR_USER, registrar_password, ["meshvpn.registrar"]))
    if observer_password is not None:
        clients.append(dynsec.client_config(access.OBSERVER_USER, observer_password, ["meshvpn.observer"]))
    if nodes:
        if mesh is None:
            raise ValueError("node accounts belong to a mesh: give `mesh`")
        roles.append(mesh_node_role(mesh))
        for node, password in nodes.items():
            role = node_role(mesh, node)
            roles.append(role)
            clients.append(dynsec.client_config(node, password, [role.name, mesh_node_role_name(mesh)]))
    return dynsec.config_file(clients, roles)


def _service_role(username: str) -> str:
    role = access.role_of(username)
    if role is Role.REGISTRAR:
        return registrar_role().name
    if role is Role.OBSERVER:
        return observer_role().name
    raise CredentialsError(f"{username!r} is not a service account (registrar or observer)")


class DynsecAccounts:
    """Node accounts in Mosquitto through its dynamic security control topic."""

    def __init__(self, admin: dynsec.DynsecAdmin, *, mesh: str) -> None:
        self._admin = admin
        self._mesh = mesh
        self._ready = False

    def _bootstrap(self) -> None:
        # The mesh's shared node role, and the observer's and registrar's roles, as the current code defines
        # them (an upgrade may change GRANTS): created if missing, their ACLs replaced if they exist.
        if self._ready:
            return
        roles = [mesh_node_role(self._mesh), observer_role(), registrar_role()]
        self._admin.run([dynsec.create_role(r) for r in roles])
        self._admin.run([{"command": "modifyRole", "rolename": r.name, "acls": list(r.acls)} for r in roles])
        self._ready = True

    def ensure(self, accounts: Mapping[str, str]) -> None:
        if not accounts:
            return
        self._bootstrap()
        commands = []
        for node, password in accounts.items():
            role = node_role(self._mesh, node)
            commands += [
                dynsec.create_role(role),
                dynsec.create_client(node, password, [role.name, mesh_node_role_name(self._mesh)]),
            ]
        responses = self._admin.run(commands)
        existing = [
            c["username"] for c, r in zip(commands, responses, strict=True)
            if c["command"] == "createClient" and r.get("error") == "Client already exists"
        ]  # fmt: skip
        if existing:
            self._admin.run([dynsec.set_client_password(node, accounts[node]) for node in existing])

    def remove(self, node_ids: Iterable[str]) -> None:
        commands = []
        for node in node_ids:
            commands += [dynsec.delete_client(node), dynsec.delete_role(_node_role_name(self._mesh, node))]
        self._admin.run(commands)

    def set_service_account(self, username: str, password: str) -> None:
        self._bootstrap()
        role = _service_role(username)
        (response,) = self._admin.run([dynsec.create_client(username, password, [role])])
        if response.get("error") == "Client already exists":
            self._admin.run([dynsec.set_client_password(username, password)])

    def wait_ready(self, timeout: float) -> bool:
        return self._admin.wait_ready(timeout)

    def names(self) -> set[str]:
        """This mesh's node accounts: one Mosquitto may serve several meshes, whose nodes are not ours."""
        (response,) = self._admin.run([{**dynsec.list_clients(), "verbose": True}])
        ours = mesh_node_role_name(self._mesh)
        names = set()
        for client in response.get("data", {}).get("clients", []):
            roles = {r.get("rolename") for r in client.get("roles", []) if isinstance(r, dict)}
            if ours in roles and access.role_of(client.get("username")) is Role.NODE:
                names.add(client["username"])
        return names
