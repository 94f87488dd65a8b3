"""Mosquitto's dynamic security plugin: its config file format and its control API, knowing nothing of meshes.

With `mosquitto_dynamic_security.so` Mosquitto keeps clients, roles and ACLs in a JSON file it owns, and an
admin client changes them at run time by publishing commands on `$CONTROL/dynamic-security/v1`; a deleted or
disabled client is disconnected at once. The builders here are pure; `DynsecAdmin` is the I/O: one MQTT
connection of the admin account, commands out, responses matched by correlation data.

Mosquitto 2.0.11 does not substitute %u or %c in dynsec ACL topics (tested: a `.../%u` pattern matches
nothing), so per-client permissions are literal topics in a role of their own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt

from registrar.errors import CredentialsError

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
_ITERATIONS = 101  # what mosquitto_ctrl writes; the plugin reads the count from the file

AclType = Literal[
    "publishClientSend",
    "publishClientReceive",
    "subscribeLiteral",
    "subscribePattern",
    "unsubscribeLiteral",
    "unsubscribePattern",
]


class DynsecError(CredentialsError):
    """A dynamic security command failed or got no answer."""


def plugin_path() -> str | None:
    """Where this machine's Mosquitto dynamic security plugin is, if installed."""
    return next((p for p in PLUGIN_PATHS if os.path.exists(p)), None)


def acl(acltype: AclType, topic: str, *, allow: bool = True, priority: int = 0) -> dict[str, Any]:
    """One ACL entry of a role."""
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}


@dataclass(frozen=True, slots=True)
class Role:
    """A named set of ACL entries."""

    name: str
    acls: tuple[dict[str, Any], ...]

    def as_config(self) -> dict[str, Any]:
        return {"rolename": self.name, "acls": list(self.acls)}


def password_fields(password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    """The plugin's stored form of a password: PBKDF2-HMAC-SHA512, base64 hash and salt, iteration count."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _ITERATIONS,
    }


def client_config(username: str, password: str, roles: list[str]) -> dict[str, Any]:
    """A client entry of the plugin's config file."""
    return {
        "username": username,
        **password_fields(password),
        "roles": [{"rolename": r} for r in roles],
    }


def config_file(clients: list[dict[str, Any]], roles: list[Role]) -> dict[str, Any]:
    """The plugin's config file: these clients and roles, everything else denied (no anonymous group)."""
    return {
        "clients": clients,
        "roles": [r.as_config() for r in roles],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def admin_role(name: str = "dynsec-admin") -> Role:
    """What the admin account may do: the control topics and nothing else."""
    return Role(
        name,
        (
            acl("publishClientSend", f"{CONTROL_TOPIC}/#"),
            acl("publishClientSend", CONTROL_TOPIC),
            acl("publishClientReceive", f"{CONTROL_TOPIC}/#"),
            acl("subscribePattern", f"{CONTROL_TOPIC}/#"),
        ),
    )


# -- commands ---------------------------------------------------------------------------------------------


def create_client(username: str, password: str, roles: list[str]) -> dict[str, Any]:
    return {
        "command": "createClient",
        "username": username,
        "password": password,
        "roles": [{"rolename": r} for r in roles],
    }


def delete_client(username: str) -> dict[str, Any]:
    return {"command": "deleteClient", "username": username}


def set_client_password(username: str, password: str) -> dict[str, Any]:
    return {"command": "setClientPassword", "username": username, "password": password}


def create_role(role: Role) -> dict[str, Any]:
    return {"command": "createRole", "rolename": role.name, "acls": list(role.acls)}


def delete_role(name: str) -> dict[str, Any]:
    return {"command": "deleteRole", "rolename": name}


def get_client(username: str) -> dict[str, Any]:
    return {"command": "getClient", "username": username}


def list_clients() -> dict[str, Any]:
    return {"command": "listClients", "verbose": False, "count": -1, "offset": 0}


# Errors that mean "already as wanted" for commands used as idempotent ensure/remove steps.
ALREADY = frozenset({"Client already exists", "Role already exists", "Client not found", "Role not found"})


class DynsecAdmin:
    """Runs dynamic security commands over one MQTT connection of the admin account (thread-safe)."""

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._waiting: dict[str, queue.SimpleQueue] = {}
        self._subscribed = threading.Event()
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a: self._subscribed.set()
        client.on_disconnect = lambda *a: self._subscribed.clear()
        client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("dynamic security admin refused by the broker: %s", reason_code)
            return
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(msg.payload).get("responses", [])
        except (ValueError, AttributeError):
            log.warning("unreadable dynamic security response: %r", msg.payload[:200])
            return
        for response in responses:
            box = self._waiting.get(str(response.get("correlationData")))
            if box is not None:
                box.put(response)

    def wait_ready(self, timeout: float) -> bool:
        """True once connected and subscribed to the responses (again, after a lost connection)."""
        return self._subscribed.wait(timeout)

    def run(self, commands: list[dict[str, Any]], *, timeout: float = 10.0, tolerate=ALREADY) -> list[dict]:
        """Send `commands` in one control message; their responses in order. DynsecError on an error not in
        `tolerate` or when an answer is missing within `timeout`."""
        if not commands:
            return []
        ids = [secrets.token_hex(8) for _ in commands]
        boxes = {i: queue.SimpleQueue() for i in ids}
        with self._lock:
            self._waiting.update(boxes)
        try:
            payload = json.dumps(
                {"commands": [{**c, "correlationData": i} for c, i in zip(commands, ids, strict=True)]}
            )
            info = self._client.publish(CONTROL_TOPIC, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise DynsecError(f"cannot send dynamic security commands: {mqtt.error_string(info.rc)}")
            responses = []
            for command, i in zip(commands, ids, strict=True):
                try:
                    response = boxes[i].get(timeout=timeout)
                except queue.Empty:
                    raise DynsecError(f"no answer to {command['command']} within {timeout}s") from None
                error = response.get("error")
                if error and error not in tolerate:
                    raise DynsecError(
                        f"{command['command']} {command.get('username') or command.get('rolename') or ''}: {error}"
                    )
                responses.append(response)
            return responses
        finally:
            with self._lock:
                for i in ids:
                    self._waiting.pop(i, None)
