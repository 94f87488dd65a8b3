"""Issue 11: whoever may read the broker learns no secret. An observer and an enrolled node, each subscribed
to everything it may read (and trying `#`, `meshvpn/#`, `$SYS/#` and every other node's topics), listen while
nodes enroll, register, rotate their key, re-register and are removed. No join token or token secret, no
node's broker password, no password or token hash, no private key (WireGuard, the registrar's signing key,
its TLS and CA keys) and no admin credential appears in any topic or payload they receive: not verbatim, not
in hex, not in base64 at any alignment.

Runs on both brokers, with the accounts the registrar creates.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator

import httpx
import pytest
from brokers import MosquittoBroker, ProbeClient, RunningBroker
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from harness import MESH, REGISTRAR_PASSWORD, Mesh, Registrar
from polling import wait_for

from meshcontract import jointoken, topics
from meshcontract.access import parse_password_file
from meshcontract.messages import EnrollRequest
from meshcontract.topics import Kind
from nodeagent.statestore import StateStore

SPY = "spy"
SPY_PASSWORD = "spy-own-broker-password-0000"


def everything(node: str | None) -> list[str]:
    """Every filter worth trying: the whole tree, the broker's own, each family with and without wildcards."""
    filters = ["#", "meshvpn/#", "$SYS/#", f"meshvpn/v1/{MESH}/#", f"meshvpn/v1/{MESH}/+/+"]
    filters.append("meshvpn/v1/+/+/+")
    for kind in Kind:
        if kind in topics.PER_NODE:
            filters.append(topics.subscription(MESH, kind))
            if node is not None:
                filters.append(topics.build(MESH, kind, node))
        else:
            filters.append(topics.build(MESH, kind))
    return filters


class Sniffer:
    """A broker client that subscribes to every filter in `filters` it is allowed, and keeps what arrives."""

    def __init__(self, broker: RunningBroker, user: str, password: str, filters: list[str]) -> None:
        self.client = ProbeClient(broker, client_id=user, username=user, password=password)
        assert self.client.rc == 0, f"{user} could not log in"
        self.granted = [f for f in filters if self.client.subscribe(f) != 0x80]

    def received(self) -> list[tuple[str, bytes]]:
        return self.client.received()


@pytest.fixture
def sniffed(broker: RunningBroker, registrar: Registrar) -> Iterator[tuple[Mesh, Sniffer, Sniffer]]:
    mesh = Mesh(registrar.state_dir.parent, registrar)
    observer_password = registrar.api("POST", "/v1/accounts/observer").json()["password"]
    spy_key = base64.b64encode(os.urandom(32)).decode()
    secret = jointoken.parse(mesh.token).secret
    request = EnrollRequest(
        node_id=SPY, name=SPY, public_key=spy_key, listen_port=51820, token=secret, password=SPY_PASSWORD
    )
    url = f"{registrar.http_url}/v1/enroll"
    enrolled = httpx.post(url, content=request.model_dump_json(), verify=registrar.tls(), timeout=10)
    assert enrolled.status_code == 200, enrolled.text
    sniffers: list[Sniffer] = []
    try:
        sniffers.append(Sniffer(broker, "observer", observer_password, everything(None)))
        sniffers.append(Sniffer(broker, SPY, SPY_PASSWORD, everything(SPY)))
        yield mesh, sniffers[0], sniffers[1]
    finally:
        mesh.close()
        for sniffer in sniffers:
            sniffer.client.close()


def forms(secret: bytes) -> set[bytes]:
    """`secret` as it could show up in a payload: verbatim, hex, and base64 (standard and URL-safe) at each of
    the three alignments it can have inside a longer encoded text (the 4-character groups that also hold
    neighbouring bytes are left out)."""
    found = {secret, secret.hex().encode(), secret.hex().upper().encode()}
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + secret)
            core = text[4 if shift else 0 : -4]
            if len(core) >= 12:
                found.add(core)
    return found


def key_bytes(pem: bytes) -> bytes:
    """The raw private scalar of a PEM private key (Ed25519 or EC)."""
    key = load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_numbers().private_value.to_bytes(32, "big")


def b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


class Secrets:
    """Every secret of the mesh, by a name for the failure message, each in all of its `forms`."""

    def __init__(self) -> None:
        self.named: dict[str, set[bytes]] = {}

    def add(self, name: str, text: str | bytes, *, raw: bytes | None = None) -> None:
        value = text.encode() if isinstance(text, str) else text
        self.named.setdefault(name, set()).update(forms(value))
        if raw is not None:
            self.named[name].update(forms(raw))

    def hash(self, name: str, hashed: str) -> None:
        """A Mosquitto-style `$7$iterations$salt$digest` hash: the whole string and its digest."""
        self.add(name, hashed, raw=b64(hashed.rsplit("$", 1)[1]))

    def found_in(self, topic: str, payload: bytes) -> list[str]:
        haystack = topic.encode() + b"\n" + payload
        return [name for name, values in self.named.items() if any(v in haystack for v in values)]


def collect(
    registrar: Registrar, broker: RunningBroker, mesh: Mesh, join_tokens: list[str], old_keys: dict[str, str]
) -> Secrets:
    found = Secrets()
    for n, token in enumerate(join_tokens):
        secret = jointoken.parse(token).secret
        found.add(f"join token {n}", token)
        found.add(f"join token {n}'s secret", secret)
        found.add(f"join token {n}'s secret without its prefix", secret.removeprefix(jointoken.SECRET_PREFIX))
        found.add(f"join token {n}'s hash", hashlib.sha256(secret.encode()).hexdigest())
    state = registrar.state_dir
    with sqlite3.connect(state / "registrar.db") as db:
        for (hashed,) in db.execute("SELECT hash FROM tokens"):
            found.add("stored token hash", hashed)
        for node, hashed in db.execute("SELECT node_id, password_hash FROM members"):
            found.hash(f"{node}'s password hash (registrar)", hashed)
    for name in ("signing.key", "ca.key", "server.key"):
        pem = (state / name).read_bytes()
        body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
        found.add(f"registrar {name}", body, raw=key_bytes(pem))
    found.add("admin token", (state / "admin_token").read_text().strip())
    found.add("registrar broker password", REGISTRAR_PASSWORD)
    found.add("spy's broker password", SPY_PASSWORD)
    for name, node in mesh.nodes.items():
        store = StateStore(node.settings.state_dir)
        found.add(f"{name}'s broker password", store.broker_password() or "")
        private = (node.settings.state_dir / "private.key").read_text().strip()
        found.add(f"{name}'s private key", private, raw=b64(private))
    for name, private in old_keys.items():
        found.add(f"{name}'s rotated-away private key", private, raw=b64(private))
    if isinstance(broker, MosquittoBroker):
        found.add("broker admin password", broker.admin_password)
        for client in json.loads(broker.dynsec_file.read_text())["clients"]:
            if "password" in client:
                hashed = client["password"]
                found.add(f"{client['username']}'s password hash (dynsec)", hashed, raw=b64(hashed))
    else:
        for user, hashed in parse_password_file(broker.password_file.read_text()).items():
            found.hash(f"{user}'s password hash (password file)", hashed)
    return found


def test_no_secret_reaches_anyone_reading_the_broker(sniffed, broker, registrar: Registrar, capsys):
    mesh, observer, spy = sniffed
    for name in ("alpha", "beta", "gamma"):
        mesh.add(name)
    mesh.wait_complete()
    ids = {name: node.running.node_id for name, node in mesh.nodes.items()}

    # beta rotates its WireGuard key: a new private key, the same node, the same mesh IP
    beta_dir = mesh.node("beta").settings.state_dir
    old_keys = {"beta": (beta_dir / "private.key").read_text().strip()}
    mesh.stop("beta")
    (beta_dir / "private.key").unlink()
    rotated = mesh.start("beta").public_key
    wait_for(
        lambda: any(n["node_id"] == ids["beta"] and n["public_key"] == rotated for n in registrar.nodes()),
        what="beta's new key registered",
    )
    mesh.wait_complete()
    # gamma re-registers (a new session of the same node), delta joins with a single-use token
    mesh.stop("gamma")
    mesh.start("gamma")
    join_tokens = [mesh.token, registrar.create_token(reusable=False)]
    mesh.token = join_tokens[1]
    mesh.add("delta")
    mesh.wait_complete()
    # alpha is removed: its account is deleted, its session cut, its record tombstoned
    registrar.cli("nodes", "remove", ids["alpha"])
    mesh.stop("alpha")
    mesh.wait_complete()
    revision = registrar.api("GET", "/v1/mesh").json()["revision"]

    def saw_revision(sniffer: Sniffer) -> bool:
        snapshot = topics.build(MESH, Kind.SNAPSHOT)
        seen = [json.loads(p)["revision"] for t, p in sniffer.received() if t == snapshot and p]
        return max(seen, default=-1) >= revision

    wait_for(lambda: saw_revision(observer) and saw_revision(spy), what="both sniffers saw the last revision")
    tombstone = (topics.build(MESH, Kind.MEMBERS, ids["alpha"]), b"")
    wait_for(lambda: tombstone in observer.received(), what="the observer saw alpha's record tombstoned")

    found = collect(registrar, broker, mesh, join_tokens, old_keys)
    # A positive control: the search recognises what the spy's HTTPS enrollment carried.
    secret = jointoken.parse(join_tokens[0]).secret
    carried = EnrollRequest(
        node_id=SPY, name=SPY, public_key=rotated, listen_port=1, token=secret, password=SPY_PASSWORD
    ).model_dump_json()
    assert {"join token 0's secret", "spy's broker password"} <= set(found.found_in("", carried.encode()))
    leaks = []
    for who, sniffer in (("observer", observer), ("spy node", spy)):
        for topic, payload in sniffer.received():
            leaks += [(who, topic, name) for name in found.found_in(topic, payload)]
    assert not leaks, f"secrets seen on the broker: {leaks}"
    kinds = {topics.parse(t).kind for t, _ in observer.received() if t.startswith("meshvpn/")}
    # They were listening: the observer got every family it may read, the node the membership stream.
    assert {Kind.SNAPSHOT, Kind.DELTA, Kind.MEMBERS, Kind.STATUS, Kind.HEARTBEAT, Kind.REGISTRAR} <= kinds
    assert {Kind.SNAPSHOT, Kind.DELTA} <= {topics.parse(t).kind for t, _ in spy.received()}
    with capsys.disabled():
        print(
            f"\n{len(observer.received())} messages to the observer, {len(spy.received())} to the spy node "
            f"(subscribed to {spy.granted}); {len(found.named)} secrets searched"
        )


SAMPLE = b"mvj_0123456789abcdefghijKLMNOP"


@pytest.mark.parametrize(
    "encode",
    [
        lambda b: b,
        bytes.hex,
        lambda b: b.hex().upper(),
        base64.b64encode,
        base64.urlsafe_b64encode,
        lambda b: json.dumps({"x": base64.b64encode(b).decode()}).encode(),
    ],
    ids=["verbatim", "hex", "HEX", "base64", "base64url", "base64 in JSON"],
)
@pytest.mark.parametrize("before", [b"", b"a", b"ab", b"abc"])
def test_the_search_finds_a_secret_however_it_is_encoded(encode, before):
    """The search itself: a secret wrapped in other bytes, then encoded, is found at every alignment."""
    found = Secrets()
    found.add("sample", SAMPLE)

    def wrapped(secret: bytes) -> bytes:
        payload = encode(before + secret + b"tail")
        return b"{" + (payload if isinstance(payload, bytes) else payload.encode()) + b"}"

    assert found.found_in("t", wrapped(SAMPLE)) == ["sample"]
    assert found.found_in("t", wrapped(b"mvj_another-secret-entirely-00")) == []
