"""Real MQTT brokers for tests: Mosquitto and the embedded amqtt broker, each in its own process.

Both listen on a random free port on 127.0.0.1 and can be stopped and started again on the same port (to test
reconnects). `users` maps username -> password, with the rights of meshcontract.access: Mosquitto runs the
dynamic security plugin as shipped (node accounts get the roles registrar.accounts builds for `mesh`, and an
admin account lets the test add users at run time, as the registrar does); the embedded broker reads a
Mosquitto-format password file. users=None means an open broker: anonymous access and no ACL, for quick tests.

    with start_mosquitto(tmp_path, users={"registrar": "pw"}, mesh="m1") as broker:
        broker.url  # "mqtt://127.0.0.1:PORT"
        broker.add_user("n1", "pw1")  # effective once it returns
        broker.stop(); broker.start()
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from broker.mosquitto_config import (
    ALL_LOG_TYPES,
    AnonymousAccess,
    DynsecAuth,
    Listener,
    MosquittoConfig,
    MosquittoLogging,
    TlsFiles,
    render,
)
from meshcontract import access
from meshcontract.access import hash_password, parse_password_file, render_password_file
from meshcontract.transport import release
from registrar import accounts, dynsec

START_DEADLINE_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _write_atomically(path: Path, text: str) -> None:
    # Write then rename: neither the embedded broker (which reads the file at every CONNECT) nor Mosquitto
    # (on SIGHUP) can read a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class RunningBroker:
    """A broker process on 127.0.0.1:`port`. Use as a context manager; `stop()`/`start()` keep the port."""

    kind = "?"

    def __init__(self, workdir: Path, *, users: dict[str, str] | None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = users
        self.password_file = workdir / "passwords"
        self.log_file = workdir / "broker.log"
        self._proc: subprocess.Popen | None = None
        _write_atomically(
            self.password_file,
            render_password_file({u: hash_password(p) for u, p in (users or {}).items()}),
        )

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks read its CPU and memory from /proc)."""
        return self._proc.pid if self.running else None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> RunningBroker:
        """Start the broker (again, on the same port) and return once it accepts TCP connections."""
        if self.running:
            return self
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
            )
        deadline = time.monotonic() + START_DEADLINE_S
        while not _accepts(self.host, self.port):
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.kind} broker exited with {self._proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.kind} broker not listening on {self.port} after {START_DEADLINE_S}s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Kill the broker (SIGKILL: like a crash, no goodbyes) and wait until it is gone."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=10)
        self._proc = None

    def add_user(self, name: str, password: str) -> None:
        """Add or replace a user in the password file; the broker accepts it once this returns."""
        entries = parse_password_file(self.password_file.read_text())
        entries[name] = hash_password(password)
        _write_atomically(self.password_file, render_password_file(entries))
        self._reload()

    def remove_user(self, name: str) -> None:
        """Delete a user from the password file; the embedded broker drops its session within a second."""
        entries = parse_password_file(self.password_file.read_text())
        entries.pop(name, None)
        _write_atomically(self.password_file, render_password_file(entries))

    def _reload(self) -> None:
        """Make the broker see the new password file (embedded: re-read on the next CONNECT)."""

    def log(self) -> str:
        """The broker's output so far (for failure messages)."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> RunningBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{self.kind} broker {self.url}>"


class MosquittoBroker(RunningBroker):
    """`mosquitto -c conf`, the conf rendered by broker.mosquitto_config with the dynamic security plugin."""

    kind = "mosquitto"

    def __init__(
        self, workdir: Path, *, users: dict[str, str] | None, mesh: str = "m1", tls: TlsFiles | None = None
    ) -> None:
        super().__init__(workdir, users=users)
        self.mesh = mesh
        self.tls = tls
        self.admin_password = secrets.token_urlsafe(12)
        self.dynsec_file = workdir / "dynamic-security.json"
        self._admin: dynsec.DynsecAdmin | None = None
        self._admin_client: mqtt.Client | None = None
        if users is not None:
            special = {u: p for u, p in users.items() if access.role_of(u) is not access.Role.NODE}
            unknown = set(special) - {access.REGISTRAR_USER, access.OBSERVER_USER}
            nodes = {u: p for u, p in users.items() if u not in special}
            config = accounts.initial_config(
                registrar_password=special.get(access.REGISTRAR_USER),
                admin_password=self.admin_password,
                observer_password=special.get(access.OBSERVER_USER),
                mesh=mesh,
                nodes=nodes,
            )
            # A username that is neither a node nor a known account gets no rights at all (tests of refusals).
            for user in sorted(unknown):
                config["clients"].append(dynsec.client_config(user, special[user], []))
            self.dynsec_file.write_text(json.dumps(config, indent=1))
        self.config_file = workdir / "mosquitto.conf"
        self.config_file.write_text(render(self._config()))

    def _config(self) -> MosquittoConfig:
        auth: DynsecAuth | AnonymousAccess = AnonymousAccess()
        if self.users is not None:
            auth = DynsecAuth(config_file=str(self.dynsec_file), plugin=dynsec.plugin_path() or "missing-plugin")
        return MosquittoConfig(
            listeners=(Listener(self.host, self.port, self.tls),),
            auth=auth,
            # Tests run as root: keep root instead of dropping to the mosquitto user, which cannot read tmp_path.
            run_as="root",
            logging=MosquittoLogging(file=str(self.log_file), types=ALL_LOG_TYPES, timestamp_format="%H:%M:%S"),
        )

    def _command(self) -> list[str]:
        return ["mosquitto", "-c", str(self.config_file)]

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def admin(self) -> dynsec.DynsecAdmin:
        """The dynamic security admin of this broker (connected on first use; again after a restart)."""
        if self._admin is None or self._admin_client is None or not self._admin_client.is_connected():
            if self._admin_client is not None:
                self._admin_client.loop_stop()
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=access.BROKER_ADMIN_USER, protocol=mqtt.MQTTv311
            )
            client.username_pw_set(access.BROKER_ADMIN_USER, self.admin_password)
            if self.tls is not None:
                client.tls_set(cert_reqs=ssl.CERT_NONE)
                client.tls_insecure_set(True)
            admin = dynsec.DynsecAdmin(client)
            client.connect(self.host, self.port)
            client.loop_start()
            if not admin.wait_ready(START_DEADLINE_S):
                raise RuntimeError(f"dynamic security admin could not connect:\n{self.log()}")
            self._admin, self._admin_client = admin, client
        return self._admin

    def add_user(self, name: str, password: str) -> None:
        """Create (or re-password) an account at run time, through the plugin like the registrar does."""
        assert self.users is not None, "an open broker has no users"
        self.users[name] = password
        role = access.role_of(name)
        if role is access.Role.NODE:
            accounts.DynsecAccounts(self.admin(), mesh=self.mesh).ensure({name: password})
            return
        roles = {access.Role.REGISTRAR: ["meshvpn.registrar"], access.Role.OBSERVER: ["meshvpn.observer"]}
        responses = self.admin().run([dynsec.create_client(name, password, roles.get(role, []))])
        if responses[0].get("error") == "Client already exists":
            self.admin().run([dynsec.set_client_password(name, password)])

    def remove_user(self, name: str) -> None:
        """Delete an account; its live session is dropped at once."""
        self.admin().run([dynsec.delete_client(name)])

    def close_admin(self) -> None:
        """Disconnect the test's dynamic security admin: a registrar's admin logs in with the same account, and so
        the same client id, and the two would take the session from each other."""
        if self._admin_client is not None:
            if self._admin_client.is_connected():
                self._admin_client.disconnect()
            self._admin_client.loop_stop()
            self._admin_client, self._admin = None, None

    def stop(self) -> None:
        self.close_admin()
        super().stop()


class EmbeddedBrokerProcess(RunningBroker):
    """`python -m broker` (the embedded amqtt broker) in a subprocess, so a test can kill and restart it."""

    kind = "amqtt"

    def __init__(
        self, workdir: Path, *, users: dict[str, str] | None, allow_anonymous: bool = False, mesh: str | None = None
    ) -> None:
        super().__init__(workdir, users=users)
        self.allow_anonymous = allow_anonymous or users is None
        self.mesh = mesh

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "broker", "--host", self.host, "--port", str(self.port)]
        if self.users is not None:
            cmd += ["--password-file", str(self.password_file)]
        if self.allow_anonymous:
            cmd.append("--allow-anonymous")
        if self.mesh is not None:
            cmd += ["--mesh", self.mesh]
        return cmd


def start_mosquitto(
    tmp_path: Path, *, users: dict[str, str] | None = None, mesh: str = "m1", tls: TlsFiles | None = None
) -> RunningBroker:
    """Start Mosquitto on a random port under `tmp_path`. users=None: anonymous, no ACL."""
    return MosquittoBroker(_workdir(tmp_path, "mosquitto"), users=users, mesh=mesh, tls=tls).start()


def start_embedded(
    tmp_path: Path, *, users: dict[str, str] | None = None, allow_anonymous: bool = False, mesh: str | None = None
) -> RunningBroker:
    """Start the embedded broker (`python -m broker`) on a random port. users=None: anonymous, no ACL; `mesh`
    binds it to one mesh, as the registrar runs it."""
    workdir = _workdir(tmp_path, "amqtt")
    return EmbeddedBrokerProcess(workdir, users=users, allow_anonymous=allow_anonymous, mesh=mesh).start()


def _workdir(tmp_path: Path, kind: str) -> Path:
    n = 0
    while (tmp_path / f"{kind}-{n}").exists():
        n += 1
    return tmp_path / f"{kind}-{n}"


class ProbeClient:
    """A paho MQTT 3.1.1 client for tests: connect and wait for CONNACK, subscribe and wait for SUBACK,
    publish and wait for PUBACK, and a queue of every message received.

        with ProbeClient(broker, client_id="n1", username="n1", password="pw") as c:
            c.subscribe("meshvpn/v1/m/members/+")
            msg = c.expect("meshvpn/v1/m/members/n2")
    """

    def __init__(
        self,
        broker: RunningBroker | str,
        *,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes | str, bool] | None = None,
        keepalive: int = 10,
        clean_session: bool = True,
        connect: bool = True,
        nodelay: bool = True,
    ) -> None:
        url = broker.url if isinstance(broker, RunningBroker) else broker
        host_port = url.split("://", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.keepalive = keepalive
        self.messages: queue.Queue = queue.Queue()
        self.seen: list = []  # messages taken from the queue by expect(), in order
        self.connack: queue.Queue = queue.Queue()
        self.disconnected = threading.Event()
        self._subacks: dict[int, queue.Queue] = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            protocol=mqtt.MQTTv311, reconnect_on_failure=False,
        )
        if nodelay:  # like meshcontract.transport.make_client
            self.client.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=will[2])
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc.value)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self._subacks.setdefault(mid, queue.Queue()).put(
            [rc.value for rc in rcs]
        )
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.rc: int | None = None
        if connect:
            self.connect()

    def connect(self, timeout: float = 5.0) -> int:
        """Connect and return the CONNACK code (0 = accepted; 5 = not authorized). Raises on timeout."""
        self.client.connect(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        try:
            self.rc = self.connack.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no CONNACK within {timeout}s") from None
        return self.rc

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> int:
        """Subscribe and return the granted QoS (0x80 = refused)."""
        _, mid = self.client.subscribe(topic_filter, qos)
        box = self._subacks.setdefault(mid, queue.Queue())
        try:
            return box.get(timeout=timeout)[0]
        except queue.Empty:
            raise TimeoutError(f"no SUBACK for {topic_filter} within {timeout}s") from None

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False, timeout: float = 5.0):
        """Publish and (QoS 1) wait for the PUBACK."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(timeout)
        return info

    def expect(self, topic: str, payload: bytes | str | None = None, *, timeout: float = 5.0):
        """Wait for a message on `topic` (and with `payload`); everything received meanwhile goes to `seen`."""
        want = payload.encode() if isinstance(payload, str) else payload
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                msg = self.messages.get(timeout=max(left, 0))
            except queue.Empty:
                got = [(m.topic, m.payload) for m in self.seen]
                raise TimeoutError(f"no message on {topic} ({want!r}) within {timeout}s; saw {got}") from None
            self.seen.append(msg)
            if msg.topic == topic and (want is None or msg.payload == want):
                return msg

    def received(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of every message so far (drains the queue into `seen`)."""
        while not self.messages.empty():
            self.seen.append(self.messages.get_nowait())
        return [(m.topic, m.payload) for m in self.seen]

    def close(self) -> None:
        """Disconnect cleanly (DISCONNECT: no will)."""
        self.client.disconnect()
        release(self.client)

    def __enter__(self) -> ProbeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
