"""Fuzzing the registrar's HTTP API: requests derived from its OpenAPI schema, made hostile, and what must hold.

One source for tests/integration/test_api_fuzz.py (bounded, derandomized) and bench/bench_fuzz.py (a large budget).
`requests_for(spec)` walks the schema the app itself serves (app.openapi()): every operation, with path and query
parameters and JSON bodies built from their JSON schemas (the models' own constraints), then made hostile the way
tests/fuzzing.py makes MQTT payloads hostile, sent with every kind of credential: none, the admin's, a member's,
wrong ones, malformed ones. `check_response` holds every answer to:

- never a 5xx (but a 503 the API documents: the address pool is exhausted);
- an error never echoes what the request carried (path, query, headers, body);
- an error, or a request without valid credentials (but for the public enrollment), changes nothing: members,
  tokens, revoked keys and broker accounts are as before; a member's credential can change only that member;
- whatever happened, the registrar's state keeps its invariants (tests/fuzzing.py).

The registrar runs for real (writer thread, in-memory store and broker accounts, a broker port nobody listens on),
as in tests/integration/test_registrar_api.py, behind starlette's TestClient.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from urllib.parse import quote

from fastapi.testclient import TestClient
from fuzzing import (
    ODD_STRINGS,
    check_state_invariants,
    dumps,
    edits,
    hostile_text,
    json_values,
    key,
    latin1,
    mutate,
    pick,
    raw_payloads,
    render,
)
from hypothesis import strategies as st

from meshcontract.messages import EnrollRequest, MeshSettings, RegistrarInfo
from meshcontract.ratelimit import RatePolicy
from meshcontract.signing import Signer
from meshcontract.transport import BrokerSettings
from registrar import engine, tokens
from registrar.accounts import MemoryAccounts
from registrar.api import create_app
from registrar.membership import LivenessPolicy
from registrar.service import RegistrarService
from registrar.store import MemoryStore

ADMIN = "fuzz-admin-secret"
TOKEN = "mvj_fuzz-http-token-0123456789"
TOKEN_ID = tokens.token_hash(TOKEN)[: tokens.ID_LEN]
PIN = "P" * 43
PASSWORD = "fuzz-node-password-0123"
MESH = "lab"
NETWORK = "10.8.0.0/24"
INFO = RegistrarInfo(mesh=MESH, ca_pem="(the CA)", broker_url="mqtts://broker.example:8883")
NODES = {"n1": 1, "n2": 2}  # enrolled, with their keys
REMOVED = ("n3", 3)  # removed by the admin: key 3 revoked
# Generous: the fuzzer sends thousands of requests from one "address"; the limiter has its own tests.
RATE = RatePolicy(rate_per_s=1e6, burst=1e6)


def basic(user: str | bytes, password: str | bytes) -> str:
    user = user.encode() if isinstance(user, str) else user
    password = password.encode() if isinstance(password, str) else password
    return "Basic " + base64.b64encode(user + b":" + password).decode()


# ---- the registrar under test ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What a request may or may not change."""

    state: engine.CoreState
    accounts: dict[str, str]


class ApiHarness:
    """A running registrar behind a TestClient, with members, a token and a revoked key; `reset()` restores that
    baseline when a request (a valid admin removal, a key rotation...) took it away."""

    def __init__(self, *, broker_port: int) -> None:
        self._broker_port = broker_port
        self.service: RegistrarService | None = None
        self.client: TestClient | None = None
        self.spec: dict = {}
        self.requests = 0
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        store = MemoryStore()
        table, _ = tokens.create(tokens.EMPTY, secret=TOKEN, now=0, reusable=True)
        store.tokens.update(table)
        config = engine.Config(
            mesh=MeshSettings(
                mesh=MESH, network=NETWORK, heartbeat_interval_s=1, heartbeat_ttl_s=3, persistent_keepalive_s=0,
                mtu=1420,
            ),
            policy=LivenessPolicy(ttl_s=3, expiry_s=60, grace_s=4),
        )  # fmt: skip
        self.accounts = MemoryAccounts()
        # No broker listens there: the writer never ticks (it is deaf while disconnected), so the state changes only
        # through requests, and HTTP writes still go through the writer.
        self.service = RegistrarService(
            config=config, store=store, broker=BrokerSettings(url=f"mqtt://127.0.0.1:{self._broker_port}"),
            network=NETWORK, quarantine_s=60, signer=Signer.generate(), accounts=self.accounts,
        )  # fmt: skip
        self.service.start()
        app = create_app(self.service, admin_token=ADMIN, info=INFO, pin=PIN, rate=RATE)
        self.app = app
        self.spec = app.openapi()
        self.client = TestClient(app, raise_server_exceptions=False)
        self.client.__enter__()
        for node, k in (*NODES.items(), REMOVED):
            self._enroll(node, k)
        removed = self.service.call(lambda state, now: engine.remove_member(state, REMOVED[0], now=now))
        assert removed.removed
        self.baseline = self.seen()

    def _enroll(self, node: str, k: int) -> None:
        request = EnrollRequest(
            node_id=node, name=f"node {node}", public_key=key(k), listen_port=51820, token=TOKEN, password=PASSWORD
        )
        outcome = self.service.enroll(request)
        assert outcome.enroll_reply is not None and outcome.enroll_reply.ok, outcome.rejected

    def close(self) -> None:
        if self.client is not None:
            self.client.__exit__(None, None, None)
        if self.service is not None:
            self.service.stop()

    def seen(self) -> Seen:
        return Seen(self.service.state, dict(self.accounts.passwords))

    def reset(self) -> None:
        """Back to the baseline if a request moved away from it (a fresh registrar: cheaper than undoing)."""
        now = self.seen()
        members = now.state.membership.members
        intact = (
            all(n in members and members[n].public_key == key(k) for n, k in NODES.items())
            and TOKEN_ID in now.state.tokens
            and key(REMOVED[1]) in now.state.revoked
            and len(members) < 50  # enrollments by the fuzzer fill the pool
        )
        if not intact:
            self.close()
            self.restarts += 1
            self._start()


# ---- requests from the schema ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One operation of the OpenAPI schema."""

    method: str
    path: str
    params: tuple[tuple[str, str, dict], ...]  # (name, in, schema)
    body: dict | None  # the JSON schema of the request body
    defs: dict = field(default_factory=dict, compare=False, hash=False)  # what its $refs may point to
    secured: bool = False


def operations(spec: dict) -> list[Operation]:
    """Every operation the schema describes."""
    components = {f"#/components/schemas/{n}": s for n, s in spec.get("components", {}).get("schemas", {}).items()}
    ops = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            defs = dict(components)
            if body is not None:
                defs.update({f"#/$defs/{n}": s for n, s in body.get("$defs", {}).items()})
            params = tuple((p["name"], p["in"], p.get("schema", {})) for p in op.get("parameters", ()))
            ops.append(Operation(method.upper(), path, params, body, defs, secured=bool(op.get("security"))))
    return ops


# Values that reach past the first check, by field name: the schema cannot know which keys or tokens are real.
HINTS = {
    "public_key": pick((3, st.builds(key, st.integers(1, 9))), hostile_text),
    "token": pick((3, st.sampled_from([TOKEN, f"{TOKEN}.{PIN}", "mvj_unknown-token-000000"])), hostile_text),
    "password": pick((3, st.sampled_from([PASSWORD, "another-password-000000"])), hostile_text),
    "node_id": pick((3, st.sampled_from([*NODES, REMOVED[0], "n7", "n8"])), hostile_text),
    "request_id": st.sampled_from(["http-req-0001", "http-req-0002"]),
}


def from_schema(schema: dict, defs: dict, name: str | None = None, depth: int = 0) -> st.SearchStrategy:
    """Values a JSON schema allows (mostly: patterns and bounds as written, not every keyword)."""
    if name in HINTS:
        return HINTS[name]
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"]], defs, name, depth + 1)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for combined in ("anyOf", "oneOf"):
        if combined in schema:
            return st.one_of([from_schema(s, defs, name, depth + 1) for s in schema[combined]])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, defs, k, depth + 1) for k, v in props.items() if k in required},
            optional={k: from_schema(v, defs, k, depth + 1) for k, v in props.items() if k not in required},
        )
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs, None, depth + 1) if depth < 4 else st.nothing()
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(3, schema.get("maxItems", 3)))
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength", 80)
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True).filter(lambda s: low <= len(s) <= high)
        return st.text(min_size=low, max_size=min(high, 80))
    if kind == "integer":
        return st.integers(int(schema.get("minimum", -(2**63))), int(schema.get("maximum", 2**63)))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(
            min_value=low, max_value=schema.get("maximum"), allow_nan=False,
            exclude_min="exclusiveMinimum" in schema, allow_infinity=False,
        )  # fmt: skip
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return json_values


class Request:
    """One HTTP request, and the credentials it carries (for the properties). Not a dataclass: hypothesis would
    print every field of a failing example in full, tens of kilobytes of it."""

    def __init__(
        self,
        method: str,
        path: str,
        params: list[tuple[str, str]],
        headers: list[tuple[bytes, bytes]],
        content: bytes,
        auth: str,
        hostile: tuple[str, ...],
    ) -> None:
        self.method = method
        self.path = path
        self.params = params
        self.headers = headers
        self.content = content
        self.auth = auth  # none | admin | node:<id> | wrong: what the credentials are
        self.hostile = hostile  # strings the request carries that an answer must not echo

    def __repr__(self) -> str:
        return (
            f"Request({self.method} {self.path[:200]} params={self.params!r:.300} auth={self.auth} "
            f"headers={self.headers!r:.300} content={self.content!r:.300})"
        )


# Surrounding white space is not part of a header value (RFC 9110, section 5.5): still the admin.
ADMIN_AUTHS = [("admin", f"Bearer {ADMIN}".encode()), ("admin", f"bearer {ADMIN} ".encode())]
NODE_AUTHS = [("node:n1", basic("n1", PASSWORD).encode()), ("node:n2", basic("n2", PASSWORD).encode())]
WRONG_AUTHS = [
    ("wrong", b"Bearer wrong-admin-token"),
    ("wrong", f"Bearer {ADMIN}x".encode()),
    ("wrong", f"Bearer {ADMIN[:-1]}".encode()),
    ("wrong", b"Bearer "),
    ("wrong", b"Bearer"),
    ("wrong", basic("n1", "wrong-password-0000").encode()),
    ("wrong", basic(REMOVED[0], PASSWORD).encode()),  # a removed member's credential is dead
    ("wrong", basic("observer", PASSWORD).encode()),
    ("wrong", basic(b"n1\xff", PASSWORD).encode()),  # not UTF-8 once decoded
    ("wrong", basic("n1", "").encode()),
    ("wrong", b"Basic " + base64.b64encode(b"n1")),  # no colon
    ("wrong", b"Basic not base64!"),
    ("wrong", "Basic \u00e9\u00e9\u00e9\u00e9".encode("latin-1")),  # not ASCII
    ("wrong", b"Basic " + base64.b64encode(PASSWORD.encode())[:-2]),  # bad padding
    ("wrong", b"basic " + base64.b64encode(b":")),
    ("wrong", b"Digest username=n1"),
]
auths = pick((3, st.sampled_from(ADMIN_AUTHS)), (2, st.sampled_from(NODE_AUTHS)), st.just(("none", None)), (3, st.sampled_from(WRONG_AUTHS)))
CONTENT_TYPES = [
    b"application/json", b"application/json; charset=utf-16", b"text/plain", b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=x", b"application/json\x00", "application/\u00e9".encode("latin-1"), b"",
]
QUERY_VALUES = {
    "boolean": st.sampled_from(["true", "false", "1", "0", "yes", "off", "True"]),
    "integer": st.integers().map(str),
}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def _hostile(value: str) -> bool:
    # Worth checking for an echo: long enough not to occur by chance, and not something an answer says anyway.
    return len(value) >= 6 and not re.fullmatch(r"[A-Za-z0-9 ._:/-]*", value)


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


header_values = pick(
    st.sampled_from([v.encode("latin-1") for v in ODD_STRINGS if all(ord(c) < 256 for c in v)]),
    st.binary(max_size=40),
    st.builds(latin1, hostile_text),
)


MAX_URL_PART = 2000  # a longer path or query never reaches the app: servers refuse a request line that long


def _quoted(value: str) -> str:
    # Lone surrogates cannot be in a URL as text, but their UTF-8-ish bytes can, percent-encoded: send those.
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def _path_value(value: str, raw: bool) -> str:
    return value if raw and not set(value) & set("?#/%") and value.isprintable() else _quoted(value)


@st.composite
def _request(draw, ops: list[tuple[Operation, st.SearchStrategy | None]]) -> Request:
    op, bodies = draw(st.sampled_from(ops))
    method = op.method if draw(st.integers(0, 7)) else draw(st.sampled_from(METHODS))
    hostile: list[str] = []
    path = op.path
    params: list[tuple[str, str]] = []
    for name, where, schema in op.params:
        if where == "path":
            value = draw(pick((3, st.sampled_from([*NODES, REMOVED[0], "n9", TOKEN_ID, "abc"])), hostile_text))
            value = value[:MAX_URL_PART]
            hostile.append(value)
            path = path.replace("{" + name + "}", _path_value(value, draw(st.booleans())))
        elif where == "query" and draw(st.booleans()):
            value = draw(pick((3, QUERY_VALUES.get(schema.get("type"), st.text(max_size=20))), hostile_text))
            value = value[:MAX_URL_PART]
            hostile.append(value)
            params.append((name, value))
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0):
        extra = (draw(hostile_text)[:MAX_URL_PART], draw(hostile_text)[:MAX_URL_PART])
        hostile.extend(extra)
        params.append(extra)
    if draw(st.integers(0, 9)) == 0:
        path += draw(st.sampled_from(["/", "/..", "%2e%2e", "/%00", "?", "//"]))
    # The body: schema-shaped and maybe edited, or generic hostile JSON, or bytes; sometimes none at all.
    form = draw(st.integers(0, 7))
    if bodies is not None and form < 5:
        shape = (draw(bodies), draw(edits), "plain" if draw(st.integers(0, 7)) else "trailing", draw(st.booleans()))
        content = render(shape)
        hostile.extend(_strings(mutate(shape[0], shape[1])))
    elif form < 6:
        value = draw(json_values)
        content = dumps(value)
        hostile.extend(_strings(value))
    elif form < 7:
        content = draw(raw_payloads)
    else:
        content = b""
    auth, credential = draw(auths)
    headers: list[tuple[bytes, bytes]] = []
    if credential is not None:
        headers.append((b"authorization", credential))
    elif draw(st.integers(0, 5)) == 0:
        value = draw(header_values)
        headers.append((b"authorization", value))
        hostile.append(value.decode("latin-1"))
    if content or draw(st.booleans()):
        headers.append((b"content-type", CONTENT_TYPES[0] if draw(st.integers(0, 3)) else draw(st.sampled_from(CONTENT_TYPES))))
    if draw(st.integers(0, 5)) == 0:
        name = draw(st.sampled_from([b"x-forwarded-for", b"host", b"accept", b"x-request-id", b"cookie"]))
        value = draw(header_values)
        headers.append((name, value))
        hostile.append(value.decode("latin-1"))
    return Request(method, path, params, headers, content, auth, tuple(s for s in hostile if _hostile(s)))


def requests_for(spec: dict) -> st.SearchStrategy[Request]:
    """Requests to every operation in `spec`, valid and hostile."""
    return _request([(op, None if op.body is None else from_schema(op.body, op.defs)) for op in operations(spec)])


# ---- the properties --------------------------------------------------------------------------------------------


def _escaped(value: str) -> set[str]:
    forms = {value}
    for ascii_only in (True, False):
        forms.add(json.dumps(value, ensure_ascii=ascii_only)[1:-1])
    return forms


def check_response(harness: ApiHarness, request: Request) -> None:
    """Send `request` (to the baseline); AssertionError if the answer or its effect breaks a property."""
    harness.reset()
    before = harness.seen()
    url = request.path
    if request.params:
        url += "?" + "&".join(f"{_quoted(k)}={_quoted(v)}" for k, v in request.params)
    response = harness.client.request(request.method, url, headers=request.headers, content=request.content)
    harness.requests += 1
    after = harness.seen()
    status = response.status_code
    text = response.content.decode("utf-8", "replace")
    if status >= 500:
        pool_exhausted = status == 503 and '"pool_exhausted"' in text
        assert pool_exhausted, f"{status} for {request!r}: {text[:500]}"
    if status >= 400:
        for value in request.hostile:
            for form in _escaped(value):
                assert form not in text, f"{status} echoes {value!r}: {text[:500]}"
    check_state_invariants(after.state)
    changed = after != before
    if not changed:
        return
    where = f"{request!r} -> {status} {text[:300]}"
    assert status < 400, f"a refused request changed the state: {where}"
    assert request.method not in ("GET", "HEAD", "OPTIONS"), f"a read changed the state: {where}"
    b, a = before.state, after.state
    if request.auth == "admin":
        return
    if request.path.split("?")[0] == "/v1/enroll":
        # Public: it may admit one member (and spend a token use, create its account), nothing more.
        assert set(b.membership.members) <= set(a.membership.members), f"enrollment removed a member: {where}"
        assert a.revoked == b.revoked, f"enrollment changed revocations: {where}"
        for node, member in b.membership.members.items():
            assert a.membership.members[node] == member, f"enrollment changed member {node}: {where}"
        return
    assert request.auth.startswith("node:"), f"a request without credentials changed the state: {where}"
    node = request.auth.removeprefix("node:")
    assert a.tokens == b.tokens and a.revoked == b.revoked, f"a node changed tokens or revocations: {where}"
    assert after.accounts == before.accounts, f"a node changed broker accounts: {where}"
    assert set(a.membership.members) == set(b.membership.members), f"a node added or removed members: {where}"
    for other, member in b.membership.members.items():
        if other != node:
            assert a.membership.members[other] == member, f"{node}'s credential changed member {other}: {where}"

