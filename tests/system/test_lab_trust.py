"""Issue 11, on a real lab (agents with wireguard-go in network namespaces): whoever holds the registrar's
rights on the broker still cannot change anyone's tunnels. Membership is what the registrar signed, and never
older than what an agent holds.

The attacker has broker-admin rights. On Mosquitto that is the dynamic security admin (`meshvpn.admin`): it
locks the registrar's account out and makes itself an account with the registrar's role. On the embedded
broker it is whoever can write the broker's password file: they set their own password on the registrar's
account and take over its session. Either way the registrar is off the broker while the attacker publishes,
so nothing genuine repairs the forgeries:
  - deltas to agents in sync: unsigned and signed by another key, each adding a fake peer, and a replayed
    genuine delta (the one that added a node since removed);
  - snapshots, retained, to every agent as it reconnects (each is restarted): unsigned and signed by another
    key (with a fake peer), and a replayed genuine snapshot from before that node was removed;
  - replies to the restarted agents' registrations: a new address, MTU and a route for everything.
Every agent keeps exactly its tunnels (`wg show` in its namespace) and its addresses, MTU and routes (`ip`),
and logs why it dropped each forgery; replays are ignored without a word (they are genuine, only old).
Afterwards the registrar is let back, the mesh is what it was, pings pass, and a genuine change (a new node)
reaches everyone.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import lab_missing
from polling import wait_for

from meshcontract import topics
from meshcontract.access import (
    BROKER_ADMIN_USER,
    REGISTRAR_USER,
    hash_password,
    parse_password_file,
    render_password_file,
)
from meshcontract.messages import (
    Endpoint,
    MemberRecord,
    MembershipDelta,
    MembershipSnapshot,
    MemberState,
    MeshSettings,
    RegisterReply,
    RegisterRequest,
    decode,
    encode,
)
from meshcontract.signing import Signer
from meshcontract.topics import Kind
from meshlab.context import CONTROL_NODE
from meshlab.lab import Lab, new_lab_id
from meshlab.plan import BROKER_PORT
from meshlab.settings import LabSettings
from registrar import dynsec
from registrar.files import write_atomically

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

NODES = ["n1", "n2", "n3"]
JOIN_DEADLINE = 30.0
HELPER = Path(__file__).resolve().parent / "nsmqtt.py"
STOLEN = "attacker-chosen-password-000"
MALLORY = "mallory"


def _missing() -> str | None:
    return lab_missing("ip", "ss", "wireguard-go", "wg", "ping")


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def lab(request, tmp_path_factory):
    reason = _missing()
    if not reason and request.param == "mosquitto" and shutil.which("mosquitto") is None:
        reason = "mosquitto not installed (scripts/bootstrap installs it)"
    if reason:
        print(f"skipping the lab trust tests: {reason}")
        pytest.skip(reason)
    settings = LabSettings(
        lab_dir=tmp_path_factory.mktemp("trust"), broker=request.param, heartbeat_interval_s=1.0,
        heartbeat_ttl_s=3.0, join_timeout_s=JOIN_DEADLINE,
    )  # fmt: skip
    lab = Lab(settings, report=lambda line: print(f"[lab] {line}"))
    lab_id = new_lab_id()
    try:
        lab.up(len(NODES), lab_id=lab_id)
        yield lab
    finally:
        lab.down()


class NsClient:
    """A broker client in the lab's control namespace (tests/system/nsmqtt.py), driven from here."""

    def __init__(self, lab: Lab, username: str, password: str) -> None:
        self.username = username
        argv, env = lab.traffic.command(CONTROL_NODE, [sys.executable, str(HELPER)])
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.events: queue.Queue[dict] = queue.Queue()
        self.messages: list[tuple[str, bytes]] = []
        self.disconnected = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ca = str(lab.store.control_dir / "ca.pem")
        host = lab.plan().control_ip
        self._send(op="connect", host=host, port=BROKER_PORT, ca=ca, username=username, password=password)
        self.rc = self._expect("connack")["rc"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            if event["event"] == "message":
                self.messages.append((event["topic"], base64.b64decode(event["payload"])))
            elif event["event"] == "disconnected":
                self.disconnected.set()
            else:
                self.events.put(event)

    def _send(self, **command: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def _expect(self, kind: str, timeout: float = 10.0) -> dict:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.username}: no {kind} within {timeout}s") from None
        assert event["event"] == kind, event
        return event

    def subscribe(self, *filters: str) -> list[int]:
        self._send(op="subscribe", filters=list(filters))
        return self._expect("suback")["granted"]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1 and return once the broker acknowledged it."""
        self._send(op="publish", topic=topic, payload=base64.b64encode(payload).decode(), retain=retain)
        self._expect("puback")

    def received(self, topic: str) -> list[bytes]:
        return [p for t, p in list(self.messages) if t == topic]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self._send(op="close")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


# --- the attacker's broker rights --------------------------------------------------------------------------


def health(lab: Lab) -> dict:
    return lab.control.registrar_health(lab.plan()) or {}


def run_dynsec(lab: Lab, commands: list[dict]) -> None:
    """Run dynamic security commands as Mosquitto's admin. One session per account: ours takes over the
    registrar's admin session (it comes back on its own), and may be taken back before the answer; retry."""
    password = (lab.store.control_dir / "broker-admin.password").read_text().strip()
    commands = [{**c, "correlationData": str(i)} for i, c in enumerate(commands)]
    deadline = time.monotonic() + 30
    while True:
        admin = NsClient(lab, BROKER_ADMIN_USER, password)
        try:
            assert admin.rc == 0, f"the broker admin was refused ({admin.rc})"
            admin.subscribe(f"{dynsec.CONTROL_TOPIC}/response")
            admin.publish(dynsec.CONTROL_TOPIC, json.dumps({"commands": commands}).encode())
            answered = wait_for(
                lambda a=admin: a.received(f"{dynsec.CONTROL_TOPIC}/response") or a.disconnected.is_set(),
                timeout=10, what="dynamic security answer",
            )  # fmt: skip
            if answered is True:  # taken over before the answer
                assert time.monotonic() < deadline, "the admin session was taken over every time"
                continue
            responses = json.loads(answered[0])["responses"]
            # A retry may find its work done by the attempt that lost its session before the answer.
            errors = [r for r in responses if r.get("error") and r["error"] not in dynsec.ALREADY]
            assert not errors, errors
            return
        finally:
            admin.close()


@contextlib.contextmanager
def registrar_rights(lab: Lab) -> Iterator[NsClient]:
    """A broker session with the registrar's rights while the registrar itself is locked out (see the module
    docstring); on exit the registrar's account is given back and it reconnects."""
    control = lab.store.control_dir
    mosquitto = lab.state().broker == "mosquitto"
    original = (control / "passwords").read_text() if not mosquitto else ""
    forger: NsClient | None = None
    try:
        if mosquitto:
            run_dynsec(lab, [
                dynsec.create_client(MALLORY, STOLEN, ["meshvpn.registrar"]),
                {"command": "disableClient", "username": REGISTRAR_USER},
            ])  # fmt: skip
            forger = NsClient(lab, MALLORY, STOLEN)
        else:
            entries = parse_password_file(original)
            entries[REGISTRAR_USER] = hash_password(STOLEN)
            write_atomically(control / "passwords", render_password_file(entries))
            forger = NsClient(lab, REGISTRAR_USER, STOLEN)  # takes over the registrar's session
        assert forger.rc == 0, f"the attacker's session was refused ({forger.rc})"
        wait_for(
            lambda: health(lab).get("broker_connected") is False, timeout=15, what="the registrar locked out"
        )
        yield forger
    finally:
        if forger is not None:
            forger.close()
        if mosquitto:
            run_dynsec(lab, [
                {"command": "enableClient", "username": REGISTRAR_USER}, dynsec.delete_client(MALLORY),
            ])  # fmt: skip
        else:
            entries = parse_password_file((control / "passwords").read_text())
            entries[REGISTRAR_USER] = parse_password_file(original)[REGISTRAR_USER]
            write_atomically(control / "passwords", render_password_file(entries))
        wait_for(lambda: health(lab).get("broker_connected") is True, timeout=20, what="the registrar back")


# --- what the agents hold and say --------------------------------------------------------------------------


def tunnels(lab: Lab, name: str) -> dict[str, str]:
    """public key -> allowed IPs of every WireGuard peer node `name` holds, read with `wg show`."""
    proc = lab.exec(name, ["wg", "show", lab.node(name).interface, "allowed-ips"], timeout=10)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("\t", 1) for line in proc.stdout.splitlines() if line.strip())


def all_tunnels(lab: Lab) -> dict[str, dict[str, str]]:
    return {name: tunnels(lab, name) for name in NODES}


def machine(lab: Lab, name: str) -> tuple[str, ...]:
    """What a register reply would change on node `name`: its interface's addresses, link (MTU) and routes."""
    interface = lab.node(name).interface
    out = []
    for argv in (["addr", "show", "dev", interface], ["link", "show", "dev", interface], ["route", "show"]):
        proc = lab.exec(name, ["ip", "-o", *argv], timeout=10)
        assert proc.returncode == 0, proc.stderr
        out += sorted(proc.stdout.splitlines())
    return tuple(out)


def log_count(lab: Lab, name: str, text: str) -> int:
    return lab.store.agent_log(name).read_text(errors="replace").count(text)


def logged(lab: Lab, text: str, before: dict[str, int]) -> bool:
    return all(log_count(lab, name, text) > before[name] for name in NODES)


def counts(lab: Lab, text: str) -> dict[str, int]:
    return {name: log_count(lab, name, text) for name in NODES}


def in_sync_at(lab: Lab, revision: int) -> bool:
    statuses = [lab.agent_status(name) for name in NODES]
    return all(
        s is not None and s.membership_complete and s.membership_revision >= revision for s in statuses
    )


# --- forgeries ---------------------------------------------------------------------------------------------


def signed(message, signer: Signer, kind: Kind, mesh: str):
    return message.model_copy(update={"sig": signer.sign(message, kind=str(kind), mesh=mesh)})


def fake_peer(genuine: MembershipSnapshot, revision: int) -> MemberRecord:
    """A member nobody enrolled: a fresh key and an unused address of the mesh."""
    template = genuine.members[0]
    used = {m.mesh_ip for m in genuine.members}
    prefix = template.mesh_ip.rsplit(".", 1)[0]
    ip = next(f"{prefix}.{n}" for n in range(250, 1, -1) if f"{prefix}.{n}" not in used)
    return template.model_copy(update={
        "node_id": MALLORY, "name": MALLORY, "mesh_ip": ip, "state": MemberState.ACTIVE, "revision": revision,
        "public_key": base64.b64encode(os.urandom(32)).decode(),
        "endpoints": [Endpoint(host="10.0.0.1", port=51820)],
        "updated_at": time.time(),
    })  # fmt: skip


def restart_agents(lab: Lab) -> None:
    """Kill every agent (wireguard-go keeps the tunnels) and start it again: it reconnects and reads the
    retained snapshot. Returns once each one is connected to the broker again."""
    for name in NODES:
        lab.kill(name)
    for name in NODES:
        lab.start(name, wait=False)
    wait_for(
        lambda: all((s := lab.agent_status(n)) is not None and s.broker_connected for n in NODES),
        timeout=JOIN_DEADLINE, what="every agent back on the broker",
    )  # fmt: skip


def barrier(lab: Lab, forger: NsClient, delta_topic: str, mesh: str) -> None:
    """Every agent has handled whatever reached it before: it has logged dropping a delta published after it.

    Deliveries to one subscriber are in order, so a later message handled means the earlier ones were too.
    Published again until seen, since an agent that just connected may subscribe after one of them.
    """
    before = counts(lab, "unsigned delta")
    junk = MembershipDelta(mesh=mesh, from_revision=0, to_revision=1, published_at=time.time())
    deadline = time.monotonic() + 30
    while not logged(lab, "unsigned delta", before):
        assert time.monotonic() < deadline, "agents did not log dropping the barrier delta"
        forger.publish(delta_topic, encode(junk))
        with contextlib.suppress(AssertionError):
            wait_for(lambda: logged(lab, "unsigned delta", before), timeout=2, what="barrier")


def test_forged_and_replayed_membership_changes_no_tunnel(lab: Lab):
    st = lab.state()
    mesh = st.mesh
    snapshot_topic, delta_topic = topics.build(mesh, Kind.SNAPSHOT), topics.build(mesh, Kind.DELTA)
    lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)
    observer = NsClient(
        lab, "observer", lab.control.registrar_cli(st, ["credentials", "issue", "observer"]).strip()
    )
    try:
        assert observer.rc == 0
        observer.subscribe(snapshot_topic, delta_topic)
        # A genuine history to replay later: a node joins (recorded), then is removed.
        n4 = lab.add()
        lab.wait_mesh([*NODES, n4.name], timeout=JOIN_DEADLINE)

        def with_n4() -> tuple[bytes, bytes] | None:
            snaps = [
                p
                for p in observer.received(snapshot_topic)
                if any(
                    m.node_id == n4.node_id for m in decode(MembershipSnapshot, p, max_size=1 << 24).members
                )
            ]
            adds = [
                p
                for p in observer.received(delta_topic)
                if any(m.node_id == n4.node_id for m in decode(MembershipDelta, p, max_size=1 << 24).upserts)
            ]
            return (snaps[-1], adds[0]) if snaps and adds else None

        old_snapshot, old_delta = wait_for(
            with_n4, timeout=10, what="a snapshot and a delta with n4 recorded"
        )
        lab.control.registrar_cli(st, ["nodes", "remove", n4.node_id])
        lab.crash(n4.name)
        lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)  # no ghost of n4 anywhere
        revision = health(lab)["revision"]
        wait_for(lambda: in_sync_at(lab, revision), timeout=JOIN_DEADLINE, what="agents in sync")
        genuine = decode(MembershipSnapshot, observer.received(snapshot_topic)[-1], max_size=1 << 24)
        assert genuine.revision == revision and n4.node_id not in {m.node_id for m in genuine.members}
    finally:
        observer.close()
    before = all_tunnels(lab)
    machines = {name: machine(lab, name) for name in NODES}
    fake = fake_peer(genuine, revision + 1)
    other_key = Signer.generate()

    def unchanged() -> None:
        assert all_tunnels(lab) == before, "a forgery changed a tunnel"

    with registrar_rights(lab) as forger:
        register_topic = topics.subscription(mesh, Kind.REGISTER)
        assert forger.subscribe(register_topic) == [1]
        # Deltas, to agents in sync at `revision`.
        now = time.time()
        adds_fake = MembershipDelta(
            mesh=mesh, from_revision=revision, to_revision=revision + 1, upserts=[fake], published_at=now
        )
        for forged, reason in [
            (adds_fake, "unsigned delta"),
            (signed(adds_fake, other_key, Kind.DELTA, mesh), "delta: bad signature"),
        ]:
            seen = counts(lab, reason)
            forger.publish(delta_topic, encode(forged))
            wait_for(lambda r=reason, s=seen: logged(lab, r, s), timeout=10, what=f"agents log {reason!r}")
            unchanged()
        forger.publish(delta_topic, old_delta)  # genuine, signed, but long past
        barrier(lab, forger, delta_topic, mesh)
        unchanged()
        # Snapshots, retained: what every agent reads when it (re)connects.
        takeover = MembershipSnapshot(mesh=mesh, revision=revision + 50, members=[*genuine.members, fake],
                                      published_at=time.time())  # fmt: skip
        for forged, reason in [
            (encode(takeover), "unsigned snapshot"),
            (encode(signed(takeover, other_key, Kind.SNAPSHOT, mesh)), "snapshot: bad signature"),
            (old_snapshot, None),  # genuine, signed, from before n4 was removed
        ]:
            seen = counts(lab, reason or "-")
            forger.publish(snapshot_topic, forged, retain=True)
            restart_agents(lab)
            if reason is not None:
                wait_for(
                    lambda r=reason, s=seen: logged(lab, r, s), timeout=10, what=f"agents log {reason!r}"
                )
            else:
                barrier(lab, forger, delta_topic, mesh)
            unchanged()
            for name in NODES:
                status = lab.agent_status(name)
                assert status is not None and status.membership_revision == revision, (name, status)
        # Registration replies: the agents just restarted ask the (locked out) registrar to register them;
        # the attacker, who reads their requests, answers with a new address, MTU and a route for everything.
        requests = {}
        for name in NODES:
            node_id = lab.node(name).node_id
            payload = wait_for(lambda n=node_id: forger.received(topics.build(mesh, Kind.REGISTER, n)),
                               timeout=JOIN_DEADLINE, what=f"{name}'s registration request")[-1]  # fmt: skip
            requests[name] = decode(RegisterRequest, payload)
        hijack = MeshSettings(
            mesh=mesh, network="0.0.0.0/0", heartbeat_interval_s=3600, heartbeat_ttl_s=86400,
            persistent_keepalive_s=0, mtu=576,
        )  # fmt: skip
        for reason, sign in [("unsigned reply", False), ("reply: bad signature", True)]:
            seen = counts(lab, reason)
            for request in requests.values():
                reply = RegisterReply(request_id=request.request_id, ok=True, node_id=request.node_id,
                                      mesh_ip=fake.mesh_ip, prefix_len=1, settings=hijack)  # fmt: skip
                if sign:
                    reply = signed(reply, other_key, Kind.REPLY, mesh)
                forger.publish(topics.build(mesh, Kind.REPLY, request.node_id), encode(reply))
            wait_for(lambda r=reason, s=seen: logged(lab, r, s), timeout=10, what=f"agents log {reason!r}")
        unchanged()
        assert {name: machine(lab, name) for name in NODES} == machines, "a forged reply changed a machine"

    # The registrar is back: it republishes the genuine membership and answers the agents' registrations (it
    # may first take the wills of the agents killed above for what they are, and have their tunnels dropped
    # for a moment): the mesh comes back exactly as it was.
    def as_before() -> bool:
        statuses = [lab.agent_status(name) for name in NODES]
        return (
            all(s is not None and s.ready for s in statuses)
            and in_sync_at(lab, revision)
            and all_tunnels(lab) == before
            and {name: machine(lab, name) for name in NODES} == machines
        )

    wait_for(
        as_before, timeout=JOIN_DEADLINE, what="the mesh as it was, every agent registered", interval=0.5
    )
    for src, dst in [("n1", "n2"), ("n2", "n3"), ("n3", "n1")]:
        wait_for(lambda s=src, d=dst: lab.ping(s, d), timeout=10, what=f"ping {src}->{dst}", interval=0.1)
    n5 = lab.add()
    lab.wait_mesh([*NODES, n5.name], timeout=JOIN_DEADLINE)
    wait_for(lambda: lab.ping("n1", n5.name), timeout=10, what="ping n1->n5", interval=0.1)
