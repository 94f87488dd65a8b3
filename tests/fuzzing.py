"""Fuzzing what the registrar and the agents read off MQTT: hostile inputs, and the properties they must keep.

One source for tests/unit/test_fuzz_inputs.py (a bounded, derandomized run in CI) and bench/bench_fuzz.py (a large
budget). Inputs are hypothesis strategies: message-shaped payloads with fields made hostile, dropped or added;
generic hostile JSON (deep nesting, NaN/Infinity, huge numbers, odd unicode with bidi overrides and lone
surrogates, wrong types, huge strings); raw bytes; topics that are not ours. Each `check_*` runs one input through
the code that reads it in production and raises AssertionError naming the property it broke:

- registrar: `registrar.engine.handle_message` against a state with members in every condition (active,
  unreachable, just enrolled, removed with its key revoked): never raises; a refused or ignored input leaves the
  state equal; any input keeps the invariants (one IP per member, the key index, revision only grows) and only
  ever concerns the node of its topic.
- agent: `nodeagent.session.ControlSession._on_message` (paho's callback, which hands the message to
  nodeagent.inbound: decode, verify the registrar's signature, follow) on a fake connection: never raises; anything
  not signed by the registrar's key over exactly its content changes nothing (member table, sync state, records
  seen, subscriptions, events); the revision never goes back.

No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from meshcontract import access, messages, topics
from meshcontract.errors import ContractError
from meshcontract.messages import (
    MAX_PAYLOAD,
    EnrollReply,
    EnrollRequest,
    MemberRecord,
    MembershipDelta,
    MembershipSnapshot,
    MeshSettings,
    RegisterReply,
    RegistrarInfo,
)
from meshcontract.signing import SIG_FIELD, Signer, Verifier
from meshcontract.topics import Kind
from meshcontract.transport import BrokerSettings
from nodeagent import policy
from nodeagent.connection import Connection
from nodeagent.credentials import BrokerLogin
from nodeagent.identity import Identity
from nodeagent.membership import MemberTable
from nodeagent.meshstate import MeshState
from nodeagent.session import ControlSession
from nodeagent.settings import AgentSettings
from nodeagent.statestore import StateStore
from registrar import engine, tokens
from registrar.ipam import Ipam
from registrar.liveness import LivenessPolicy
from registrar.membership import Membership

MESH = "lab"
NETWORK = "10.2.0.0/24"
CONFIG = engine.Config(
    mesh=MeshSettings(
        mesh=MESH, network=NETWORK, heartbeat_interval_s=1, heartbeat_ttl_s=3, persistent_keepalive_s=25, mtu=1420
    ),
    policy=LivenessPolicy(ttl_s=3, expiry_s=30, grace_s=4),
)
TOKEN = "mvj_fuzz-token-0123456789"
PASSWORD = "fuzz-node-password-0123"
NOW = 10.0  # when fuzzed input arrives at the registrar (after the baseline was built)


def key(n: int) -> str:
    """A valid WireGuard public key (base64 of 32 bytes) that is the same in every run."""
    return base64.b64encode(bytes([n]) * 32).decode()


# ---- hostile values ------------------------------------------------------------------------------------------

ODD_STRINGS = [
    "", " ", "\u202e", "evil\u202etxt.exe", "\u200f\u2066x\u2069", "\x00", "a\x00b", "\ufeff", "\n", "\r\nX-Injected: 1",
    "é", "e\u0301", "\U0001d54f", "\U0010ffff", "\ud800", "\udfff", "\u2028", "+", "#", "/", "n1/+", "n1/#",
    "../../etc/passwd", "%00", "%s%n", "<script>alert(1)</script>", "' OR '1'='1", "${jndi:ldap://x/a}", "NaN",
    "Infinity", "null", "true", "0", "-1", "1e999", "observer", "registrar", "meshvpn.admin", "admin", "root", "N1",
    "n1 ", " n1", "n1\n", "n1\x00", "mvj_", TOKEN, TOKEN + "." + "A" * 43, "AAAA", "=" * 44,
]
BOUNDARY_INTS = [
    0, -1, 1, 7, 8, 9, 63, 64, 575, 576, 9001, 65535, 65536, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63),
    10**100, 10**4000,
]
BOUNDARY_FLOATS = [-0.0, 1e308, 5e-324, float("nan"), float("inf"), float("-inf"), 0.5, 86400.5]


def pick(*options: st.SearchStrategy | tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of `options`, each a strategy or (weight, strategy). Unlike st.one_of, which flattens nested one_ofs
    into one list of equally likely branches (a plausible value among five hostile kinds came up one time in six),
    the weights here are what each option gets."""
    choices = [s for w, s in (o if isinstance(o, tuple) else (1, o) for o in options) for _ in range(w)]
    index = st.sampled_from(range(len(choices)))

    @st.composite
    def picked(draw):
        return draw(choices[draw(index)])

    return picked()


# Named functions, not lambdas, in st.builds: hypothesis reads a lambda's source to describe every example it
# draws, which cost more than running the example.
def _times(unit: str, n: int) -> str:
    return unit * n


def _concat(a: str, b: str) -> str:
    return a + b


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def latin1(text: str) -> bytes:
    return text.encode("latin-1", "replace")


surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=4)
huge_strings = st.builds(
    _times,
    st.sampled_from(["a", "\u202e", "é", "0", "\\", "\U0001d54f"]),
    st.sampled_from([64, 65, 129, 257, 4097, 17_000, 70_000]),
)
hostile_text = pick(
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=40),
    surrogates,
    huge_strings,
    st.builds(_concat, st.sampled_from(ODD_STRINGS), st.text(max_size=10)),
)
numbers = pick(
    st.integers(), st.sampled_from(BOUNDARY_INTS), st.floats(), st.sampled_from(BOUNDARY_FLOATS)
)
scalars = pick(st.none(), st.booleans(), (2, numbers), (3, hostile_text))
FIELD_NAMES = [
    "v", "request_id", "node_id", "name", "public_key", "endpoints", "host", "port", "listen_port", "epoch",
    "state", "at", "last_will", "seq", "sent_at", "mesh", "revision", "members", "from_revision", "to_revision",
    "upserts", "removals", "published_at", "sig", "ok", "mesh_ip", "prefix_len", "settings", "error", "code",
    "message", "instance", "started_at", "token", "password", "__proto__", "constructor",
]
json_keys = pick(st.sampled_from(FIELD_NAMES), hostile_text)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(json_keys, children, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value: object, *, ascii_only: bool = True) -> bytes:
    """JSON as a careless or hostile sender writes it: NaN/Infinity allowed, lone surrogates passed through."""
    return json.dumps(value, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _nest(depth: int, opener: str) -> bytes:
    closer = {"[": "]", '{"a":': "}", '{"node_id":': "}"}[opener]
    return (opener * depth + "1" + closer * depth).encode()


deep_json = st.builds(
    _nest, st.sampled_from([8, 9, 10, 64, 1000, 100_000]), st.sampled_from(["[", '{"a":', '{"node_id":'])
)
raw_payloads = pick(
    st.binary(max_size=200),
    deep_json,
    st.sampled_from([
        b"", b"null", b"[]", b"{}", b'""', b"0", b"NaN", b"-Infinity", b"1e999999", b"\xef\xbb\xbf{}", b"\xff\xfe",
        b'{"a":1', b"{}" * 3, b'{"v":1}\x00', b"\x80" * 10, b'"\\ud800"', b'{"v":1,"v":2}',
        b"[" * 9 + b"]" * 9, b" " * (MAX_PAYLOAD + 1), b"{" + b" " * MAX_PAYLOAD + b"}",
    ]),
)
hostile_json = st.builds(dumps, json_values, ascii_only=st.booleans())


def mutate(body: dict, mutations: list[tuple]) -> dict:
    body = dict(body)
    for op, name, *value in mutations:
        if op == "drop":
            body.pop(name, None)
        else:  # set a field (maybe one the model does not have) to something else
            body[name] = value[0]
    return body


def mutations(names: list[str]) -> st.SearchStrategy[list[tuple]]:
    """Usually none, else up to two edits of a message body: a field dropped, or set (one it has, or a new one)
    to anything."""
    edits = st.lists(
        pick(
            st.tuples(st.just("drop"), st.sampled_from(names)),
            st.tuples(st.just("set"), st.sampled_from(names), json_values),
            st.tuples(st.just("set"), json_keys, json_values),
        ),
        min_size=1,
        max_size=2,
    )
    return pick((3, st.just([])), edits)


edits = mutations(FIELD_NAMES)


def _framed(body: bytes, framing: str) -> bytes:
    if framing == "bom":
        return b"\xef\xbb\xbf" + body
    if framing == "trailing":
        return body + b" x"
    if framing == "utf16":
        return body.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    if framing == "padded":  # well-formed but over the size limit
        return body + b" " * (MAX_PAYLOAD + 1 - len(body))
    return body


Shape = tuple[dict, list, str, bool]


def shapes(base: st.SearchStrategy[dict]) -> st.SearchStrategy[Shape]:
    """A message-shaped payload before it is written: a plausible body, its edits, its framing, its escaping."""
    return st.tuples(base, edits, st.sampled_from(["plain"] * 12 + ["bom", "trailing", "utf16", "padded"]), st.booleans())


def render(shape: Shape, **fields: object) -> bytes:
    """The payload of `shape`, with `fields` set before the edits (a node id only known when the topic is)."""
    body, changes, framing, ascii_only = shape
    return _framed(dumps(mutate({**body, **fields}, changes), ascii_only=ascii_only), framing)


def shaped(base: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    """Message-shaped payloads: a plausible body, sometimes edited, usually well framed."""
    return st.builds(render, shapes(base))


def either(plausible: st.SearchStrategy, hostile: st.SearchStrategy = scalars) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes anything: a message then fails on one field at a time."""
    return pick((8, plausible), hostile)


# ---- registrar: the baseline state and what it reads -------------------------------------------------------

MEMBERS = ("n1", "n2", "n3")  # active at epoch 3, unreachable at epoch 2, just enrolled (epoch 0)
REMOVED = "n4"  # removed by an admin: its key 4 is revoked and its IP quarantined
NODE_IDS = [*MEMBERS, REMOVED, "n9", "me"]
# Reserved names, ids that are not ids, and ids with what a careless regex lets through.
ODD_IDS = ["observer", "registrar", "admin", "meshvpn", "N1", "n1-", "_n", "a" * 63, "a" * 64, "n1\n", "n1\x00", "n1 "]


def _enrolled(state: engine.CoreState, node: str, k: int) -> engine.CoreState:
    request = EnrollRequest(
        node_id=node, name=f"Node {node}", public_key=key(k), listen_port=51820, token=TOKEN, password=PASSWORD
    )
    out = engine.enroll(state, request, now=1.0, config=CONFIG, password_hash=access.hash_password(PASSWORD, salt=b"s"))
    assert out.enroll_reply is not None and out.enroll_reply.ok, out.rejected
    return out.state


def _sent(state: engine.CoreState, kind: Kind, node: str, body: dict, now: float) -> engine.CoreState:
    out = engine.handle_message(state, topics.build(MESH, kind, node), json.dumps(body).encode(), now=now, config=CONFIG)
    assert not out.rejected, out.rejected
    return out.state


def _build_baseline() -> engine.CoreState:
    table, _ = tokens.create(tokens.EMPTY, secret=TOKEN, now=0, reusable=True)
    state = engine.CoreState(Membership.create(ipam=Ipam.create(NETWORK, quarantine_s=60), started_at=0), table)
    for i, node in enumerate((*MEMBERS, REMOVED), start=1):
        state = _enrolled(state, node, i)

    def register(node: str, k: int, epoch: int) -> dict:
        return {"request_id": "req-00001", "node_id": node, "name": f"Node {node}", "public_key": key(k),
                "endpoints": [{"host": "192.0.2.10", "port": 51820}], "listen_port": 51820, "epoch": epoch}  # fmt: skip

    state = _sent(state, Kind.REGISTER, "n1", register("n1", 1, 3), 2.0)
    state = _sent(state, Kind.REGISTER, "n2", register("n2", 2, 2), 2.0)
    offline = {"node_id": "n2", "state": "offline", "epoch": 2, "at": 3.0, "last_will": True}
    state = _sent(state, Kind.STATUS, "n2", offline, 3.0)
    return engine.remove_member(state, REMOVED, now=4.0).state


_baseline: list[engine.CoreState] = []


def baseline() -> engine.CoreState:
    """Members in every condition, a reusable token, a revoked key, a quarantined IP. Immutable: share it."""
    if not _baseline:
        _baseline.append(_build_baseline())
    return _baseline[0]


node_levels = pick((8, st.sampled_from(NODE_IDS)), st.sampled_from(ODD_IDS), hostile_text)
wg_keys = pick(
    (4, st.builds(key, st.integers(1, 9))),  # members' keys, the revoked one, fresh ones
    st.builds(_b64, st.binary(min_size=0, max_size=40)),
    hostile_text,
)
epochs = either(st.sampled_from([0, 1, 2, 3, 4, 5, 2**63 - 1]), numbers)
timestamps = either(st.floats(0, 1e10), numbers)
ports = either(st.integers(1, 65535), numbers)
endpoints = either(
    st.lists(
        st.fixed_dictionaries({
            "host": either(st.sampled_from(["192.0.2.10", "2001:db8::1", "host.example", "a" * 253])),
            "port": ports,
        }),
        max_size=9,
    ),
    json_values,
)
names = either(st.sampled_from(["Node n1", "laptop", "ünïcödé", "名前", "a" * 63]), hostile_text)
request_ids = either(st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True), hostile_text)


# Bodies of what nodes send the registrar; the node id goes in when the topic is known (see registrar_inputs).
register_bodies = st.fixed_dictionaries(
    {"request_id": request_ids, "name": names, "public_key": wg_keys, "listen_port": ports, "epoch": epochs},
    optional={"v": either(st.just(1)), "endpoints": endpoints},
)
status_bodies = st.fixed_dictionaries(
    {"state": either(st.sampled_from(["online", "offline"])), "epoch": epochs, "at": timestamps},
    optional={"v": either(st.just(1)), "last_will": either(st.booleans())},
)
heartbeat_bodies = st.fixed_dictionaries(
    {"epoch": epochs, "seq": either(st.integers(0, 2**63 - 1), numbers), "sent_at": timestamps},
    optional={"v": either(st.just(1))},
)
REGISTRAR_SHAPES = {
    Kind.REGISTER: shapes(register_bodies), Kind.STATUS: shapes(status_bodies), Kind.HEARTBEAT: shapes(heartbeat_bodies)
}


def _topic(mesh: str, kind: str, node: str | None, extra: str) -> str:
    base = f"{topics.ROOT}/{topics.VERSION}/{mesh}/{kind}"
    return (base if node is None else f"{base}/{node}") + extra


odd_topics = pick(
    st.builds(
        _topic,
        either(st.just(MESH), st.sampled_from(["other", "LAB", "+", "#", ""])),
        either(st.sampled_from([k.value for k in Kind]), hostile_text),
        pick(st.none(), node_levels),
        st.sampled_from(["", "/", "/x", "/+", "/#"]),
    ),
    hostile_text,
)
eighths = st.sampled_from(range(8))


@st.composite
def registrar_inputs(draw) -> tuple[str, bytes]:
    """(topic, payload) as the registrar's subscriptions could deliver them, and as they could not."""
    kind = draw(st.sampled_from([Kind.REGISTER, Kind.STATUS, Kind.HEARTBEAT]))
    node = draw(node_levels)
    topic = _topic(MESH, kind, node, "") if draw(eighths) < 7 else draw(odd_topics)
    said = node if draw(eighths) < 6 else draw(node_levels)  # the node the payload claims to be
    form = draw(eighths)
    if form < 6:
        return topic, render(draw(REGISTRAR_SHAPES[kind]), node_id=said)
    return topic, draw(hostile_json if form == 6 else raw_payloads)


def _topic_node(topic: str) -> str | None:
    try:
        parsed = topics.parse(topic)
    except ContractError:
        return None
    return parsed.node if parsed.mesh == MESH else None


def check_state_invariants(state: engine.CoreState) -> None:
    """What must hold of every state the registrar could ever commit."""
    ms = state.membership
    members = ms.members
    ips = [m.mesh_ip for m in members.values()]
    assert len(set(ips)) == len(ips), f"duplicate mesh IPs: {sorted(ips)}"
    assert dict(ms.keys) == {m.public_key: m.node_id for m in members.values()}, "key index out of step"
    assert dict(ms.ipam.allocated) == {n: m.mesh_ip for n, m in members.items()}, "IPAM out of step with members"
    assert not set(ms.ipam.quarantine) & set(ips), "a quarantined IP is held"
    assert not set(ms.keys) & set(state.revoked), "a member holds a revoked key"
    for node, m in members.items():
        assert m.node_id == node and access.is_node_id(node), f"bad member id {node!r}"
        assert m.revision <= ms.revision, f"{node} at revision {m.revision} > {ms.revision}"
        record = m.record()  # validates every published field
        wire = messages.encode(record)
        assert messages.decode(MemberRecord, wire) == record, f"{node}'s record does not survive the wire"


def check_registrar_input(state: engine.CoreState, topic: str, payload: bytes, *, now: float = NOW) -> engine.Outcome:
    """One message through the registrar's decision; AssertionError if a property breaks."""
    out = engine.handle_message(state, topic, payload, now=now, config=CONFIG)
    before, after = state.membership, out.state.membership
    if out.rejected or out.ignored:
        assert out.state == state, f"refused input changed the state: {out.rejected or out.ignored}"
        assert out.delta.is_empty(), "refused input has something to store"
        assert not out.published and not out.removed
    if out.rejected:
        assert out.state is state
    assert out.state.tokens is state.tokens and out.state.revoked is state.revoked, "MQTT changed tokens/revocations"
    assert not out.accounts_add and not out.accounts_remove, "MQTT changed broker accounts"
    assert after.ipam == before.ipam, "MQTT input changed IP allocation"
    assert set(after.members) == set(before.members), "MQTT input added or removed a member"
    assert after.revision >= before.revision, "revision went back"
    if out.delta.revision is not None:
        assert out.delta.revision == after.revision > before.revision
    for m in out.published:
        assert m.revision == after.revision, "a changed record without the new revision"
    # A message speaks only for the node of its topic (the broker authenticated the sender as that node).
    sender = _topic_node(topic)
    for node, m in before.members.items():
        if node != sender:
            assert after.members[node] == m, f"a message on {topic!r} changed member {node}"
        else:
            assert after.members[node].mesh_ip == m.mesh_ip, "a member's mesh IP changed"
    if out.reply is not None:
        assert out.reply_to is not None and out.reply_to == sender, f"reply to {out.reply_to!r} for {topic!r}"
        wire = messages.encode(out.reply)
        assert messages.decode(RegisterReply, wire) == out.reply, "our reply does not decode"
        assert out.reply.ok == (not out.rejected)
    check_state_invariants(out.state)
    return out


registrar_steps = st.lists(
    pick(
        (4, st.tuples(st.just("msg"), registrar_inputs(), st.floats(0, 5))),
        st.tuples(st.just("tick"), st.none(), st.floats(0, 40)),
    ),
    max_size=12,
)


def check_registrar_sequence(state: engine.CoreState, steps: list[tuple]) -> None:
    """Messages and clock ticks one after another: every step keeps the properties; revision never goes back."""
    now = NOW
    for what, message, dt in steps:
        now += dt
        revision = state.membership.revision
        if what == "tick":
            out = engine.tick(state, now=now, config=CONFIG)
            check_state_invariants(out.state)
        else:
            out = check_registrar_input(state, *message, now=now)
        assert out.state.membership.revision >= revision
        state = out.state


# ---- agent: the signed stream and what else it reads -------------------------------------------------------

ME = "me"
SIGNER = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
IMPOSTOR = Signer(Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32))
START_REVISION = 5
AGENT_NODES = ["n1", "n2", "n3", "n5", ME]


def record(node: str, revision: int, state: str = "active", k: int | None = None) -> dict:
    index = AGENT_NODES.index(node) + 1 if node in AGENT_NODES else 9
    return {"node_id": node, "name": f"Node {node}", "mesh_ip": f"10.2.0.{index}", "public_key": key(k or index),
            "endpoints": [{"host": "192.0.2.10", "port": 51820}], "listen_port": 51820, "state": state,
            "revision": revision, "updated_at": 1.0}  # fmt: skip


def start_snapshot() -> MembershipSnapshot:
    members = [MemberRecord.model_validate_json(json.dumps(record(n, START_REVISION))) for n in ("n1", "n2", ME)]
    return MembershipSnapshot(mesh=MESH, revision=START_REVISION, members=members, published_at=1.0)


def _record_body(node: str, revision: int, state: str, k: int | None, changes: list) -> dict:
    return mutate(record(node, revision, state, k), changes)


record_bodies = st.builds(
    _record_body,
    pick((6, st.sampled_from(AGENT_NODES)), node_levels),
    st.integers(0, 12),
    st.sampled_from(["active", "unreachable"]),
    pick(st.none(), st.integers(1, 9)),
    mutations(list(record("n1", 1))),
)
revisions = either(st.integers(0, 12), numbers)
snapshot_bodies = st.fixed_dictionaries({
    "mesh": either(st.just(MESH), st.sampled_from(["other", "LAB"])),
    "revision": revisions,
    "members": either(st.lists(record_bodies, max_size=4), json_values),
    "published_at": timestamps,
})
delta_bodies = st.fixed_dictionaries({
    "mesh": either(st.just(MESH), st.sampled_from(["other", "LAB"])),
    "from_revision": revisions,
    "to_revision": revisions,
    "upserts": either(st.lists(record_bodies, max_size=3), json_values),
    "removals": either(st.lists(either(st.sampled_from(AGENT_NODES), node_levels), max_size=3), json_values),
    "published_at": timestamps,
})
mesh_settings = either(
    st.just(CONFIG.mesh.model_dump(mode="json")),
    st.builds(mutate, st.just(CONFIG.mesh.model_dump(mode="json")), mutations(list(CONFIG.mesh.model_dump()))),
)
reply_bodies = st.fixed_dictionaries(
    {"request_id": request_ids, "ok": either(st.booleans()), "node_id": either(st.sampled_from([ME, "n1"]))},
    optional={
        "mesh_ip": either(st.sampled_from(["10.2.0.5", "::1"]), hostile_text),
        "prefix_len": either(st.integers(0, 128), numbers),
        "settings": mesh_settings,
        "error": either(st.fixed_dictionaries({"code": either(st.sampled_from(["invalid_key", "key_revoked"])),
                                                "message": hostile_text})),  # fmt: skip
    },
)
registrar_status_bodies = st.fixed_dictionaries({
    "state": either(st.sampled_from(["online", "offline"])),
    "instance": either(st.sampled_from(["abc123"]), hostile_text),
    "started_at": timestamps,
    "at": timestamps,
})
SIGNINGS = [*["genuine"] * 6, "none", "empty", "garbage", "impostor", "other_kind", "other_mesh",
            "edited_after"]  # fmt: skip


def _signed_payload(model: type[BaseModel], kind: Kind, body: dict, signing: str, garbage: str, edits: list) -> bytes:
    try:
        message = model.model_validate_json(dumps(body))
    except ValidationError:
        return dumps({**body, SIG_FIELD: garbage})  # nothing to sign: not a message at all
    sig = {
        "genuine": lambda: SIGNER.sign(message, kind=kind, mesh=MESH),
        "none": lambda: None,
        "empty": lambda: "",
        "garbage": lambda: garbage,
        "impostor": lambda: IMPOSTOR.sign(message, kind=kind, mesh=MESH),
        "other_kind": lambda: SIGNER.sign(message, kind=Kind.DELTA if kind is Kind.SNAPSHOT else Kind.SNAPSHOT, mesh=MESH),
        "other_mesh": lambda: SIGNER.sign(message, kind=kind, mesh="other"),
        "edited_after": lambda: SIGNER.sign(message, kind=kind, mesh=MESH),
    }[signing]()
    data = message.model_dump(mode="json")
    if sig is not None:
        data[SIG_FIELD] = sig
    if signing == "edited_after":
        data = mutate(data, edits)
    return dumps(data)


def signed(model: type[BaseModel], kind: Kind, bodies: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    return st.builds(
        _signed_payload,
        st.just(model),
        st.just(kind),
        bodies,
        st.sampled_from(SIGNINGS),
        either(st.builds(_b64, st.binary(min_size=64, max_size=64)), hostile_text),
        mutations([*FIELD_NAMES, SIG_FIELD]),
    )


AGENT_PAYLOADS = {
    Kind.SNAPSHOT: signed(MembershipSnapshot, Kind.SNAPSHOT, snapshot_bodies),
    Kind.DELTA: signed(MembershipDelta, Kind.DELTA, delta_bodies),
    Kind.REPLY: shaped(reply_bodies),
    Kind.REGISTRAR: shaped(registrar_status_bodies),
}


odd_agent_topics = pick(
    st.builds(
        _topic,
        either(st.just(MESH), st.sampled_from(["other", "LAB"])),
        st.sampled_from([k.value for k in Kind]),
        pick(st.none(), node_levels),
        st.sampled_from(["", "/x", "/+"]),
    ),
    hostile_text,
)


@st.composite
def agent_inputs(draw) -> tuple[str, bytes, bool]:
    """(topic, payload, retained) as an agent's subscriptions could deliver them, and as they could not."""
    kind = draw(st.sampled_from(list(AGENT_PAYLOADS)))
    topic = _topic(MESH, kind, ME if kind is Kind.REPLY else None, "") if draw(eighths) < 7 else draw(odd_agent_topics)
    form = draw(eighths)
    if form < 6:
        payload = draw(AGENT_PAYLOADS[kind])
    else:
        payload = draw(hostile_json if form == 6 else raw_payloads)
    return topic, payload, draw(st.booleans())


class FakeClient:
    """The paho client calls a session makes from its callbacks, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def subscribe(self, *args, **kwargs) -> tuple[int, int]:
        self.calls.append(("subscribe", args))
        return 0, len(self.calls)

    def unsubscribe(self, *args, **kwargs) -> tuple[int, int]:
        self.calls.append(("unsubscribe", args))
        return 0, len(self.calls)


@dataclass
class AgentHarness:
    """A ControlSession wired to nothing: messages go straight into its paho callback."""

    session: ControlSession
    mesh: MeshState
    client: FakeClient
    conn: Connection
    events: list = field(default_factory=list)

    @classmethod
    def create(cls, *, in_sync: bool) -> AgentHarness:
        """An agent holding the start membership (persisted); `in_sync`: it has also seen the current snapshot."""
        broker = BrokerSettings(url="mqtt://127.0.0.1:1", password="configured-password")
        settings = AgentSettings(mesh=MESH, node_id=ME, state_dir=Path("/nonexistent/fuzz"), broker=broker)
        store = StateStore(settings.state_dir)  # never touched: only a registration would be saved
        snapshot = start_snapshot()
        mesh = MeshState(MemberTable.of(snapshot))
        events: list = []
        session = ControlSession(
            settings,
            identity=Identity(node_id=ME, name=ME, public_key=key(5)),
            store=store,
            login=BrokerLogin(broker=broker, store=store, node_id=ME),
            mesh=mesh,
            verifier=Verifier(SIGNER.public_key),
            registration=None,
            on_event=events.append,
        )
        client = FakeClient()
        conn = Connection(
            client=client, epoch=1, connected=threading.Event(), subscribed=threading.Event(), lost=threading.Event(),
            snapshot_subscribed=True,
        )  # fmt: skip
        harness = cls(session, mesh, client, conn, events)
        if in_sync:
            snap = snapshot.model_copy(update={SIG_FIELD: SIGNER.sign(snapshot, kind=Kind.SNAPSHOT, mesh=MESH)})
            harness.deliver(_topic(MESH, Kind.SNAPSHOT, None, ""), messages.encode(snap), retain=True)
            assert not mesh.syncing
        return harness

    def deliver(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        # A broker never delivers a topic that is not well-formed UTF-8 (MQTT 3.1.1 section 1.5.3: it closes the
        # connection of a client that sends one), so lone surrogates arrive as what a broker could deliver.
        msg = mqtt.MQTTMessage(topic=topic.encode("utf-8", "replace"))
        msg.payload = payload
        msg.retain = retain
        self.session._on_message(self.conn, msg)

    def observed(self) -> tuple:
        """Everything a message could change that others see."""
        return (
            self.mesh.current(), self.mesh.view_status(), self.mesh.known_by_key(), len(self.events),
            len(self.client.calls), self.conn.snapshot_subscribed,
        )  # fmt: skip


def genuine(topic: str, payload: bytes) -> bool:
    """Ground truth, independent of the agent's Verifier: a membership message of our mesh, on its own topic,
    whose signature is what the registrar's key makes over exactly its content (Ed25519 is deterministic)."""
    try:
        parsed = topics.parse(topic)
    except ContractError:
        return False
    model = {Kind.SNAPSHOT: MembershipSnapshot, Kind.DELTA: MembershipDelta}.get(parsed.kind)
    if model is None or parsed.mesh != MESH:
        return False
    try:
        message = messages.decode(model, payload, max_size=messages.MAX_MEMBERSHIP_PAYLOAD)
        raw = base64.b64decode(message.sig, validate=True)
    except (ContractError, binascii.Error, ValueError):
        return False
    real = base64.b64decode(SIGNER.sign(message, kind=parsed.kind, mesh=MESH))
    return message.mesh == MESH and raw == real


def check_agent_input(harness: AgentHarness, topic: str, payload: bytes, retain: bool) -> None:
    """One message through the agent's paho callback; AssertionError if a property breaks."""
    before = harness.observed()
    table = harness.mesh.current()
    harness.deliver(topic, payload, retain=retain)  # paho's network thread dies on an exception: never raise
    after = harness.observed()
    if not genuine(topic, payload):
        assert after == before, f"a message the registrar did not sign changed the agent ({topic!r})"
        return
    now = harness.mesh.current()
    assert now is not None and (table is None or now.revision >= table.revision), "membership went back"
    assert all(node == r.node_id for node, r in now.members.items())


def check_agent_sequence(harness: AgentHarness, inputs: list[tuple[str, bytes, bool]]) -> None:
    for topic, payload, retain in inputs:
        check_agent_input(harness, topic, payload, retain)


# ---- agent: what the registrar answers over HTTP at enrollment ---------------------------------------------

enroll_reply_bodies = st.fixed_dictionaries(
    {"ok": either(st.booleans()), "node_id": either(st.just(ME))},
    optional={
        "mesh_ip": either(st.just("10.2.0.5")),
        "prefix_len": either(st.integers(0, 128), numbers),
        "settings": mesh_settings,
        "broker_url": either(st.just("mqtts://broker.example:8883"), hostile_text),
        "signing_key": either(st.just(SIGNER.public_key), hostile_text),
        "error": either(st.fixed_dictionaries({"code": either(st.sampled_from(["invalid_token", "internal"])),
                                                "message": hostile_text})),  # fmt: skip
    },
)
info_bodies = st.fixed_dictionaries(
    {"mesh": either(st.just(MESH)), "ca_pem": either(st.just("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))},
    optional={"broker_url": either(st.just("mqtts://b:8883"), hostile_text)},
)
enrollment_answers = st.tuples(
    st.sampled_from([200, 400, 401, 403, 409, 429, 500, 502, 503]),
    pick((3, shaped(enroll_reply_bodies)), (3, shaped(info_bodies)), hostile_json, raw_payloads),
)


def check_enrollment_answer(status: int, body: bytes) -> None:
    """The agent's reading of /v1/enroll and /v1/info answers: contract errors or a verdict, nothing else."""
    from nodeagent.enrollment import pin_of

    try:
        reply = messages.decode(EnrollReply, body)
    except ContractError:
        pass
    else:
        verdict = policy.judge_enrollment(status, reply)
        assert verdict.action in ("registered", "fatal", "retry")
        assert verdict.action != "registered" or (status == 200 and reply.ok)
    try:
        info = messages.decode(RegistrarInfo, body)
    except ContractError:
        return
    try:
        pin_of(info.ca_pem)
    except ValueError:  # what enrollment turns into "registrar sent no valid CA"
        pass


# ---- all of it, for the bench and the tests ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One thing to fuzz: a strategy for one input and the property check it must pass."""

    name: str
    inputs: st.SearchStrategy
    check: Callable[[object], None]
    inputs_per_example: float = 1.0  # a sequence holds several inputs (the mean of its length distribution)

    def count(self, example: object) -> int:
        """How many inputs `example` is (a sequence's messages; its clock ticks are not inputs)."""
        if self.inputs_per_example == 1.0:
            return 1
        return sum(1 for step in example if step[0] != "tick")  # type: ignore[union-attr]


def _registrar_message(item) -> None:
    check_registrar_input(baseline(), *item)


def _registrar_sequence(steps) -> None:
    check_registrar_sequence(baseline(), steps)


def _agent_sequence(items) -> None:
    check_agent_sequence(AgentHarness.create(in_sync=True), items)


def _enrollment_answer(item) -> None:
    check_enrollment_answer(*item)


def _agent_check(in_sync: bool) -> Callable[[object], None]:
    def check(item) -> None:
        check_agent_input(AgentHarness.create(in_sync=in_sync), *item)

    return check


TARGETS = [
    Target("registrar-message", registrar_inputs(), _registrar_message),
    Target("registrar-sequence", registrar_steps, _registrar_sequence, inputs_per_example=4.0),
    Target("agent-message-in-sync", agent_inputs(), _agent_check(True)),
    Target("agent-message-syncing", agent_inputs(), _agent_check(False)),
    Target(
        "agent-sequence",
        st.lists(agent_inputs(), max_size=8),
        _agent_sequence,
        inputs_per_example=3.0,
    ),
    Target("agent-enrollment-answer", enrollment_answers, _enrollment_answer),
]
