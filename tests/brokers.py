"""Real MQTT brokers for tests: Mosquitto and the embedded amqtt broker, each in its own process.

Both listen on a random free port on 127.0.0.1 and can be stopped and started again on the same port (to test
reconnects). `users` maps username -> password; the password file is Mosquitto's format (one file serves both
brokers). users=None means an open broker: anonymous access and no ACL, for quick tests.

    with start_mosquitto(tmp_path, users={"registrar": "pw"}) as broker:
        broker.url  # "mqtt://127.0.0.1:PORT"
        broker.add_user("n1", "pw1")  # effective once it returns
        broker.stop(); broker.start()
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from broker.mosquitto_config import (
    ACL_FILE,
    ALL_LOG_TYPES,
    AnonymousAccess,
    MosquittoConfig,
    MosquittoLogging,
    PasswordFileAuth,
    render,
)
from meshcontract.access import hash_password, parse_password_file, render_password_file
from meshcontract.transport import release

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
    """`mosquitto -c conf`, the conf rendered by broker.mosquitto_config with the packaged acl.conf."""

    kind = "mosquitto"

    def __init__(self, workdir: Path, *, users: dict[str, str] | None, acl: bool = True) -> None:
        super().__init__(workdir, users=users)
        self.config_file = workdir / "mosquitto.conf"
        self.config_file.write_text(render(self._config(acl=acl)))

    def _config(self, *, acl: bool) -> MosquittoConfig:
        auth: PasswordFileAuth | AnonymousAccess = AnonymousAccess()
        if self.users is not None:
            auth = PasswordFileAuth(str(self.password_file), str(ACL_FILE) if acl else None)
        return MosquittoConfig(
            listen_host=self.host, listen_port=self.port, auth=auth,
            # Tests run as root: keep root instead of dropping to the mosquitto user, which cannot read tmp_path.
            run_as="root",
            logging=MosquittoLogging(file=str(self.log_file), types=ALL_LOG_TYPES, timestamp_format="%H:%M:%S"),
        )

    def _command(self) -> list[str]:
        return ["mosquitto", "-c", str(self.config_file)]

    def _reload(self) -> None:
        if not self.running:
            return
        before = self.log().count("Reloading config")
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGHUP)
        # Mosquitto reloads in its main loop right after logging this line, before it reads any further
        # packet; so once the line is out, the next CONNECT is checked against the new file.
        deadline = time.monotonic() + START_DEADLINE_S
        while self.log().count("Reloading config") <= before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not reload within {START_DEADLINE_S}s:\n{self.log()}")
            time.sleep(0.01)


class EmbeddedBrokerProcess(RunningBroker):
    """`python -m broker` (the embedded amqtt broker) in a subprocess, so a test can kill and restart it."""

    kind = "amqtt"

    def __init__(self, workdir: Path, *, users: dict[str, str] | None, allow_anonymous: bool = False) -> None:
        super().__init__(workdir, users=users)
        self.allow_anonymous = allow_anonymous or users is None

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "broker", "--host", self.host, "--port", str(self.port)]
        if self.users is not None:
            cmd += ["--password-file", str(self.password_file)]
        if self.allow_anonymous:
            cmd.append("--allow-anonymous")
        return cmd


def start_mosquitto(tmp_path: Path, *, users: dict[str, str] | None = None, acl: bool = True) -> RunningBroker:
    """Start Mosquitto on a random port under `tmp_path`. users=None: anonymous, no ACL; acl=False: no ACL."""
    return MosquittoBroker(_workdir(tmp_path, "mosquitto"), users=users, acl=acl).start()


def start_embedded(
    tmp_path: Path, *, users: dict[str, str] | None = None, allow_anonymous: bool = False
) -> RunningBroker:
    """Start the embedded broker (`python -m broker`) on a random port. users=None: anonymous, no ACL."""
    return EmbeddedBrokerProcess(_workdir(tmp_path, "amqtt"), users=users, allow_anonymous=allow_anonymous).start()


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
