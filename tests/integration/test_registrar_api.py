"""The registrar's HTTP API: enrollment, authenticated registration, reads, admin endpoints and auth, limits,
metrics, OpenAPI, TLS.

The service runs for real (writer thread, in-memory store and accounts); its broker is a port nobody listens on,
so these tests need no broker: HTTP writes go through the writer, which works while the broker is away.
"""

from __future__ import annotations

import base64
import ssl

import httpx
import pytest
from brokers import free_port
from fastapi.testclient import TestClient

from meshcontract import jointoken
from meshcontract.messages import MeshSettings, RegistrarInfo
from meshcontract.ratelimit import RatePolicy
from meshcontract.signing import Signer
from meshcontract.transport import BrokerSettings
from registrar import engine, pki, tokens
from registrar.accounts import MemoryAccounts
from registrar.api import create_app
from registrar.httpserver import MAX_BODY, HttpServer
from registrar.membership import LivenessPolicy
from registrar.metrics import COUNTERS
from registrar.service import RegistrarService
from registrar.store import MemoryStore

ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
TOKEN = "mvj_good-token-0123456789"
PIN = "P" * 43
PASSWORD = "the-node-password-0123"
INFO = RegistrarInfo(mesh="lab", ca_pem="(the CA)", broker_url="mqtts://broker.example:8883")


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def basic(node: str, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{node}:{password}".encode()).decode()}


@pytest.fixture
def service():
    store = MemoryStore()
    table, _ = tokens.create(tokens.EMPTY, secret=TOKEN, now=0, reusable=True)
    store.tokens.update(table)
    config = engine.Config(
        mesh=MeshSettings(
            mesh="lab", network="10.8.0.0/29", heartbeat_interval_s=1, heartbeat_ttl_s=3, persistent_keepalive_s=0,
            mtu=1420,
        ),
        policy=LivenessPolicy(ttl_s=3, expiry_s=60, grace_s=4),
    )  # fmt: skip
    svc = RegistrarService(
        config=config,
        store=store,
        broker=BrokerSettings(url=f"mqtt://127.0.0.1:{free_port()}"),
        network="10.8.0.0/29",
        quarantine_s=60,
        signer=Signer.generate(),
        accounts=MemoryAccounts(),
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def app(service, **kw):
    return create_app(service, admin_token=ADMIN, info=INFO, pin=PIN, **kw)


@pytest.fixture
def client(service):
    with TestClient(app(service)) as c:
        yield c


def enrollment(node="n1", k=1, **over) -> dict:
    data = {
        "node_id": node, "name": f"node {node}", "public_key": key(k), "listen_port": 51820,
        "token": TOKEN, "password": PASSWORD,
    }  # fmt: skip
    data.update(over)
    return data


def registration(node="n1", k=1, **over) -> dict:
    data = {"request_id": "http-req-1", "node_id": node, "name": f"node {node}", "public_key": key(k),
            "listen_port": 51820, "epoch": 1}  # fmt: skip
    data.update(over)
    return data


def test_info_is_public(client):
    assert client.get("/v1/info").json() == INFO.model_dump(mode="json")


def test_enroll_register_then_read(client, service):
    r = client.post("/v1/enroll", json=enrollment())
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["ok"] and reply["mesh_ip"] == "10.8.0.1" and reply["broker_url"] == INFO.broker_url
    assert reply["signing_key"] == service.signer.public_key
    assert service._accounts.passwords["n1"] == PASSWORD, "its broker account exists before it is told"
    again = client.post("/v1/register", json=registration(epoch=2), headers=basic("n1"))
    assert again.status_code == 200 and again.json()["mesh_ip"] == "10.8.0.1"
    nodes = client.get("/v1/nodes", headers=basic("n1")).json()
    assert [n["node_id"] for n in nodes] == ["n1"] and nodes[0]["epoch"] == 2
    assert client.get("/v1/nodes/n1", headers=AUTH).json()["state"] == "active"
    assert client.get("/v1/nodes/zz", headers=AUTH).status_code == 404
    mesh = client.get("/v1/mesh", headers=AUTH).json()
    assert mesh["revision"] == 1 and mesh["members"] == 1 and mesh["settings"]["network"] == "10.8.0.0/29"


@pytest.mark.parametrize("path", ["/v1/nodes", "/v1/nodes/n1", "/v1/mesh", "/metrics"])
def test_reads_need_credentials(client, path):
    client.post("/v1/enroll", json=enrollment())
    assert client.get(path).status_code == 401
    assert client.get(path, headers=basic("n1", "wrong-password-000000")).status_code == 401


@pytest.mark.parametrize(
    "header",
    [b"Basic \xe9\xe9\xe9\xe9", b"Basic not base64!", b"Basic " + base64.b64encode(b"n1\xff:password-0123456789")],
)
def test_malformed_node_credentials_are_refused_not_500(service, header):
    """Found by fuzzing: a Basic header that was not ASCII ("Basic é") failed to decode with a ValueError: a 500."""
    with TestClient(app(service), raise_server_exceptions=False) as client:
        for method, path in (("GET", "/v1/nodes"), ("POST", "/v1/register")):
            r = client.request(method, path, headers={"Authorization": header}, json=registration())
            assert r.status_code == 401, (method, path, r.text)


@pytest.mark.parametrize(
    ("method", "path", "named"),
    [
        ("GET", "/v1/nodes/n9", "no member n9"),
        ("GET", "/v1/nodes/%E2%80%AEevil%0A", None),
        ("DELETE", "/v1/nodes/%3Cscript%3E", None),
        ("DELETE", "/v1/tokens/0123456789ab", "no token 0123456789ab"),
        ("DELETE", "/v1/tokens/%00%1B%5B31m", None),
    ],
)
def test_not_found_never_echoes_arbitrary_input(client, method, path, named):
    """Found by fuzzing: a 404 repeated the path segment verbatim (bidi overrides, control characters)."""
    r = client.request(method, path, headers=AUTH)
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert detail == named if named else detail.startswith("no such "), detail


@pytest.mark.parametrize(
    ("path", "data", "status"),
    [
        ("/v1/tokens", {"reusable": True, "\u202eevil\n": 1}, 422),
        ("/v1/enroll", {**enrollment(), "\u202eevil\n": 1}, 400),
    ],
)
def test_validation_errors_never_echo_a_made_up_field(client, path, data, status):
    """Found by fuzzing: an unknown key (bidi overrides, new lines, any length) came back verbatim as the loc."""
    r = client.post(path, json=data, headers=AUTH)
    assert r.status_code == status and "(unknown field)" in r.text
    assert "evil" not in r.text and "\\u202e" not in r.text


def test_an_epoch_hijack_over_http_is_refused(client):
    """Issue 11: anyone could POST /v1/register with a member's key and a huge epoch, making the real node's
    heartbeats stale. Without the node's credential it is refused and changes nothing."""
    client.post("/v1/enroll", json=enrollment())
    before = client.get("/v1/nodes/n1", headers=AUTH).json()
    hijack = registration(epoch=2**62)
    assert client.post("/v1/register", json=hijack).status_code == 401
    assert client.post("/v1/register", json=hijack, headers=basic("n1", "guessed-wrong-0000")).status_code == 401
    client.post("/v1/enroll", json=enrollment("n2", 2))
    impostor = client.post("/v1/register", json=hijack, headers=basic("n2"))
    assert impostor.status_code == 403, "n2's credentials do not speak for n1"
    assert client.get("/v1/nodes/n1", headers=AUTH).json() == before


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (enrollment(token="mvj_bad-token-0000000000"), 403, "invalid_token"),
        (enrollment(token="bad"), 403, "invalid_token"),
        (enrollment(public_key="AAAA"), 400, None),
        (enrollment(listen_port=0), 400, None),
        (enrollment(node_id="observer"), 400, None),  # reserved account names are never node ids
        (enrollment(node_id="registrar"), 400, None),
        (enrollment(name="evil\u202etxt.exe"), 400, None),
        (enrollment(password="short"), 400, None),
    ],
)
def test_enroll_refusals(client, data, status, code):
    r = client.post("/v1/enroll", json=data)
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code


def test_enroll_conflicts_retries_and_garbage(client):
    assert client.post("/v1/enroll", json=enrollment()).status_code == 200
    retry = client.post("/v1/enroll", json=enrollment())
    assert retry.status_code == 200 and retry.json()["mesh_ip"] == "10.8.0.1", "a lost reply is answered again"
    taken = client.post("/v1/enroll", json=enrollment(k=2))
    assert taken.status_code == 401 and taken.json()["error"]["code"] == "unauthorized"
    same_key = client.post("/v1/enroll", json=enrollment("n2", 1))
    assert same_key.status_code == 409 and same_key.json()["error"]["code"] == "key_conflict"
    assert client.post("/v1/enroll", content=b"not json").status_code == 400
    deep = b'{"node_id":' * 2000 + b"1" + b"}" * 2000
    assert client.post("/v1/enroll", content=deep).status_code == 400, "nested JSON is a bad request, not a 500"
    assert client.post("/v1/register", content=deep, headers=basic("n1")).status_code == 400


def test_pool_exhausted(client):
    for n in range(6):  # a /29 has 6 host addresses
        assert client.post("/v1/enroll", json=enrollment(f"n{n}", n + 1)).status_code == 200
    r = client.post("/v1/enroll", json=enrollment("n9", 99))
    assert r.status_code == 503 and r.json()["error"]["code"] == "pool_exhausted"


def test_enrollment_floods_are_rate_limited_per_source(service):
    with TestClient(app(service, rate=RatePolicy(rate_per_s=0.01, burst=3))) as client:
        codes = [client.post("/v1/enroll", json=enrollment(token="mvj_guess-000000000000")).status_code for _ in range(5)]
        assert codes == [403, 403, 403, 429, 429]
        assert client.get("/metrics", headers=AUTH).text.count("meshvpn_registrar_rate_limited_total 2") == 1


def test_bodies_are_capped_before_they_are_read(client):
    big = b"{" + b" " * (MAX_BODY + 10) + b"}"
    assert client.post("/v1/enroll", content=big).status_code == 413

    def chunks():
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    assert client.post("/v1/enroll", content=chunks()).status_code == 413, "a streamed body without a length too"


ADMIN_ROUTES = [
    ("DELETE", "/v1/nodes/n1"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens"),
    ("DELETE", "/v1/tokens/abc"),
    ("GET", "/v1/revoked"),
    ("POST", "/v1/revoked/approve"),
    ("POST", "/v1/accounts/observer"),
    ("GET", "/metrics"),
]


def test_admin_needs_token(client):
    client.post("/v1/enroll", json=enrollment())
    for method, path in ADMIN_ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, basic("n1")):
            assert client.request(method, path, headers=headers, json={}).status_code == 401, (method, path, headers)


def test_admin_tokens_removal_revocation_approval(client, service):
    created = client.post("/v1/tokens", json={"reusable": False, "ttl_s": 60}, headers=AUTH)
    assert created.status_code == 201
    token, tid = created.json()["token"], created.json()["id"]
    assert jointoken.parse(token).pin == PIN and token in created.json()["join_command"]
    listed = client.get("/v1/tokens", headers=AUTH).json()
    assert tid in [t["id"] for t in listed] and all("token" not in t for t in listed)
    assert client.post("/v1/enroll", json=enrollment("n5", 5, token=token)).status_code == 200
    r = client.post("/v1/enroll", json=enrollment("n6", 6, token=token))
    assert r.json()["error"]["code"] == "token_used"
    assert client.delete(f"/v1/tokens/{tid}", headers=AUTH).status_code == 204
    assert client.delete(f"/v1/tokens/{tid}", headers=AUTH).status_code == 404
    # Removal: account gone, key revoked, even a reusable token does not bring it back.
    assert client.delete("/v1/nodes/n5", headers=AUTH).status_code == 204
    assert "n5" not in service._accounts.passwords and "n5" in service._accounts.removed
    assert client.delete("/v1/nodes/n5", headers=AUTH).status_code == 404
    back = client.post("/v1/enroll", json=enrollment("n5", 5))
    assert back.status_code == 403 and back.json()["error"]["code"] == "key_revoked"
    assert [r["node_id"] for r in client.get("/v1/revoked", headers=AUTH).json()] == ["n5"]
    assert client.post("/v1/revoked/approve", json={"public_key": key(5)}, headers=AUTH).status_code == 204
    r = client.post("/v1/enroll", json=enrollment("n5", 5))
    assert r.status_code == 200 and r.json()["mesh_ip"] == "10.8.0.1", "quarantined for others, not for itself"


@pytest.mark.parametrize(
    "body",
    [
        {"ttl_s": float("nan")},
        {"ttl_s": float("inf")},
        {"ttl_s": -1},
        {"max_uses": 5},  # without reusable: once silently a single-use token
        {"max_uses": 0, "reusable": True},
        {"extra": 1},
    ],
)
def test_bad_token_requests_are_refused_not_500(client, body):
    content = httpx.Request("POST", "/", json=body).content if "nan" not in str(body) and "inf" not in str(body) else (
        b'{"ttl_s": NaN}' if "nan" in str(body) else b'{"ttl_s": Infinity}'
    )
    r = client.post("/v1/tokens", content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text


def test_observer_password(client, service):
    r = client.post("/v1/accounts/observer", headers=AUTH)
    assert r.status_code == 200 and r.json()["username"] == "observer"
    assert service._accounts.passwords["observer"] == r.json()["password"]


def test_local_admin_needs_no_token(service):
    with TestClient(app(service, local_admin=True)) as client:
        assert client.post("/v1/tokens", json={"reusable": True}).status_code == 201


def test_health_metrics_openapi(client, service):
    client.post("/v1/enroll", json=enrollment())
    client.post("/v1/enroll", json=enrollment("n2", 2, token="mvj_bad-token-0000000000"))
    # no broker listens: alive, not ready
    assert client.get("/healthz").json() == {"ok": True, "ready": False, "broker_connected": False, "revision": 1}
    text = client.get("/metrics", headers=AUTH).text
    assert 'meshvpn_registrar_members{state="active"} 1' in text
    assert "meshvpn_registrar_enrollments_total 1" in text
    assert "meshvpn_registrar_enrollments_refused_total 1" in text
    assert "meshvpn_registrar_internal_errors_total 0" in text
    assert "meshvpn_registrar_revision 1" in text
    for counter in service.counters:  # every counter the service keeps is exported
        spec = next(s for s in COUNTERS if s.key == counter)
        assert f"\nmeshvpn_registrar_{spec.metric} " in text
    spec = client.get("/openapi.json").json()
    assert "/v1/enroll" in spec["paths"] and spec["paths"]["/v1/enroll"]["post"]["description"]
    assert client.get("/docs").status_code == 200


def test_real_server_over_tls(service, tmp_path):
    keys = pki.load_or_create(tmp_path, mesh="lab", server_names=["localhost", "127.0.0.1"])
    server = HttpServer(
        app(service), host="127.0.0.1", port=0, certfile=keys.files.server_cert, keyfile=keys.files.server_key
    )
    server.start()
    try:
        base = f"https://127.0.0.1:{server.port}"
        trust = ssl.create_default_context(cadata=keys.ca_pem.decode())
        r = httpx.post(f"{base}/v1/enroll", json=enrollment(), verify=trust, timeout=10)
        assert r.status_code == 200 and r.json()["mesh_ip"] == "10.8.0.1"
        assert httpx.get(f"{base}/v1/nodes/n1", headers=basic("n1"), verify=trust, timeout=10).json()["name"] == "node n1"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", timeout=10)  # not trusted without the mesh CA
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)  # no plain HTTP on the TLS port
    finally:
        server.stop()
