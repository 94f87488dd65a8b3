"""Issue 11: the registrar killed (SIGKILL) during 500 concurrent enrollments over HTTPS, then restarted on
the same state directory. Every enrollment it acknowledged is kept with the same mesh IP, no mesh IP is given
twice, the database is intact, the broker holds exactly one account per member (none left over by the
enrollments the kill cut short, none missing), and the restarted registrar enrolls again: the cut-short
enrollments retried as the agent retries them (same key, same password), and new nodes.

Runs with broker accounts the test can read from the broker's side: the standalone embedded broker's password
file, Mosquitto's dynamic security, and the embedded broker inside the registrar (killed with it). Each
enrollment comes from its own loopback address (127.0.x.y), as nodes on a network do: the registrar's
per-address rate limit is part of the product, not something to switch off here.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from brokers import (
    EmbeddedBrokerProcess,
    MosquittoBroker,
    RunningBroker,
    free_port,
    start_embedded,
    start_mosquitto,
)
from harness import REGISTRAR_PASSWORD, Registrar
from polling import wait_for

from meshcontract import access, jointoken
from meshcontract.access import parse_password_file
from meshcontract.messages import EnrollRequest
from registrar import dynsec

ENROLLMENTS = 500
KILL_AFTER = 150  # acknowledged enrollments before the SIGKILL: well inside the burst, with many in flight
WORKERS = 48
RETRIED = 40  # cut-short enrollments retried after the restart (all of them would only cost time)
FRESH = 5


@dataclass(frozen=True)
class Enrollment:
    """One node's enrollment request: its own id, WireGuard key, broker password and source address."""

    node_id: str
    public_key: str
    password: str
    source: str

    def body(self, secret: str) -> bytes:
        request = EnrollRequest(
            node_id=self.node_id, name=self.node_id, public_key=self.public_key, listen_port=51820,
            token=secret, password=self.password,
        )  # fmt: skip
        return request.model_dump_json().encode()


def enrollments(prefix: str, count: int, *, first_source: int = 0) -> list[Enrollment]:
    made = []
    for i in range(count):
        n = first_source + i
        made.append(
            Enrollment(
                node_id=f"{prefix}{i:03d}",
                public_key=base64.b64encode(os.urandom(32)).decode(),
                password=secrets.token_urlsafe(18),
                source=f"127.0.{1 + n // 250}.{1 + n % 250}",
            )
        )
    return made


class Enroller:
    """Posts enrollments to the registrar, each from its own source address; keeps what each was answered."""

    def __init__(self, registrar: Registrar, secret: str) -> None:
        self.port = registrar.http_port
        self.secret = secret
        self.tls = registrar.tls()
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # node id -> mesh IP, for every 200
        self.refused: dict[str, int] = {}  # node id -> status of any other answer
        self.failed: set[str] = set()  # no answer at all (the kill)

    def post(self, e: Enrollment) -> tuple[int, bytes]:
        # http.client rather than httpx: a connection the kill cuts mid-handshake is closed here, not left to
        # the garbage collector (an unclosed SSL socket warning fails the test).
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=20, context=self.tls, source_address=(e.source, 0)
        )
        try:
            headers = {"Content-Type": "application/json"}
            conn.request("POST", "/v1/enroll", body=e.body(self.secret), headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def enroll(self, e: Enrollment) -> None:
        try:
            status, body = self.post(e)
        except (OSError, http.client.HTTPException):
            with self.lock:
                self.failed.add(e.node_id)
            return
        with self.lock:
            if status == 200:
                self.acked[e.node_id] = json.loads(body)["mesh_ip"]
            else:
                self.refused[e.node_id] = status

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


SERVICE_ACCOUNTS = {access.REGISTRAR_USER, access.BROKER_ADMIN_USER}
Accounts = Callable[[], set[str]]


def read_accounts(broker: RunningBroker | None, registrar: Registrar) -> Accounts:
    """How to read every account the broker holds, from the broker's own files (not through the registrar).

    Mosquitto's dynamic security plugin saves its file after every change; asking the plugin instead would
    need a second session of the admin account, and Mosquitto keeps one session per client id.
    """
    if isinstance(broker, MosquittoBroker):
        dynsec_file = broker.dynsec_file
        return lambda: {c["username"] for c in json.loads(dynsec_file.read_text())["clients"]}
    if isinstance(broker, EmbeddedBrokerProcess):
        path = broker.password_file
    else:
        path = registrar.state_dir / "passwords"
    return lambda: set(parse_password_file(path.read_text()))


@pytest.fixture(params=["amqtt", "mosquitto", "in-registrar"])
def crashable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Registrar, Accounts]]:
    """A registrar subprocess and a reader of its broker's accounts: on the standalone embedded broker
    (password file), on Mosquitto (dynamic security), or with the embedded broker inside it."""
    broker: RunningBroker | None = None
    if request.param == "mosquitto":
        if shutil.which("mosquitto") is None or dynsec.plugin_path() is None:
            pytest.skip("Mosquitto with its dynamic security plugin is not installed")
        broker = start_mosquitto(tmp_path, users={access.REGISTRAR_USER: REGISTRAR_PASSWORD})
    elif request.param == "amqtt":
        broker = start_embedded(tmp_path, users={access.REGISTRAR_USER: REGISTRAR_PASSWORD})
    embedded_port = free_port() if broker is None else None
    registrar = Registrar(broker, tmp_path / "registrar", embedded_port=embedded_port)
    try:
        registrar.start()
        yield registrar, read_accounts(broker, registrar)
    finally:
        registrar.kill()
        if broker is not None:
            broker.stop()


def integrity(registrar: Registrar) -> str:
    with sqlite3.connect(registrar.state_dir / "registrar.db") as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def members_of(registrar: Registrar) -> dict[str, str]:
    """node id -> mesh IP of every member, as the registrar serves them; no mesh IP twice."""
    members = {m["node_id"]: m["mesh_ip"] for m in registrar.nodes()}
    assert len(set(members.values())) == len(members), "a mesh IP was given twice"
    return members


def test_kill_during_500_enrollments_keeps_every_acknowledged_one(crashable, capsys):
    registrar, broker_accounts = crashable
    enroller = Enroller(registrar, jointoken.parse(registrar.create_token(reusable=True)).secret)
    batch = enrollments("c", ENROLLMENTS)
    killed = threading.Event()

    def kill_part_way() -> None:
        wait_for(lambda: enroller.count() >= KILL_AFTER, timeout=60, what=f"{KILL_AFTER} acknowledged")
        registrar.kill()
        killed.set()

    killer = threading.Thread(target=kill_part_way, daemon=True)
    killer.start()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(enroller.enroll, batch))
    killer.join(10)
    assert killed.is_set(), "the registrar was killed part-way"
    assert not enroller.refused, f"refused before the kill: {enroller.refused}"
    acked, unanswered = dict(enroller.acked), len(enroller.failed)
    assert len(set(acked.values())) == len(acked), "two acknowledged enrollments got the same mesh IP"
    cut_short = [e for e in batch if e.node_id not in acked]
    assert cut_short, "the kill came after the last enrollment: nothing was cut short"
    assert integrity(registrar) == "ok"

    registrar.start()
    members = members_of(registrar)
    lost = {n: ip for n, ip in acked.items() if members.get(n) != ip}
    assert not lost, f"acknowledged enrollments lost or moved by the restart: {lost}"
    assert set(members) <= {e.node_id for e in batch}
    # Ready means the start-up check of the broker's accounts is done: no account of an enrollment the kill
    # cut short between creating its account and committing it, none missing for a member.
    assert broker_accounts() - SERVICE_ACCOUNTS == set(members)

    # An agent whose enrollment got no answer retries with the same key and password: answered now, with the
    # address it was given if the registrar committed it before the kill. And new nodes join.
    committed_unanswered = [e for e in cut_short if e.node_id in members]
    retried = committed_unanswered + [e for e in cut_short if e.node_id not in members][:RETRIED]
    fresh = enrollments("f", FRESH, first_source=ENROLLMENTS)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(enroller.enroll, retried + fresh))
    assert not enroller.refused, f"refused after the restart: {enroller.refused}"
    missing = [e.node_id for e in retried + fresh if e.node_id not in enroller.acked]
    assert not missing, f"not enrolled after the restart: {missing}"
    moved = {e.node_id for e in committed_unanswered if enroller.acked[e.node_id] != members[e.node_id]}
    assert not moved, f"a retried enrollment got another mesh IP than the one committed: {moved}"
    after = members_of(registrar)
    assert all(after[n] == ip for n, ip in members.items()), "a member's mesh IP changed"
    assert set(after) == set(members) | {e.node_id for e in retried + fresh}
    wait_for(
        lambda: broker_accounts() - SERVICE_ACCOUNTS == set(after),
        timeout=10,
        what="one broker account per member after the restart",
    )
    assert integrity(registrar) == "ok"
    with capsys.disabled():
        print(
            f"\n{len(acked)} of {ENROLLMENTS} enrollments acknowledged before the kill, "
            f"{unanswered} unanswered ({len(committed_unanswered)} of them committed); "
            f"{len(members)} members after the restart, {len(after)} after retries and new nodes"
        )
