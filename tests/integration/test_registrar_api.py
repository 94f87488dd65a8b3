"""The registrar's HTTP API: registration semantics, reads, admin endpoints and auth, metrics, OpenAPI.

The service runs for real (writer thread, in-memory store); its broker is a port nobody listens on, so these
tests need no broker: HTTP writes go through the writer, which works while the broker is away.
"""

from __future__ import annotations

import base64

import httpx
import pytest
from brokers import free_port
from fastapi.testclient import TestClient
from registrar.credentials import MemoryCredentials

from meshcontract.messages import MeshSettings
from meshcontract.transport import BrokerSettings
from registrar import engine, tokens
from registrar.api import HttpServer, create_app
from registrar.membership import LivenessPolicy
from registrar.metrics import COUNTERS
from registrar.service import RegistrarService
from registrar.store import MemoryStore

ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


@pytest.fixture
def service():
    store = MemoryStore()
    table, _ = tokens.create(tokens.EMPTY, secret="mvj_good", now=0, reusable=True)
    store.tokens.update(table)
    config = engine.Config(
        mesh=MeshSettings(
            mesh="lab",
            network="10.8.0.0/29",
            heartbeat_interval_s=1,
            heartbeat_ttl_s=3,
            persistent_keepalive_s=0,
            mtu=1420,
        ),
        policy=LivenessPolicy(ttl_s=3, expiry_s=60, grace_s=4),
    )
    svc = RegistrarService(
        config=config,
        store=store,
        broker=BrokerSettings(url=f"mqtt://127.0.0.1:{free_port()}"),
        network="10.8.0.0/29",
        quarantine_s=60,
        credentials=MemoryCredentials(),
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def client(service):
    with TestClient(create_app(service, admin_token=ADMIN)) as c:
        yield c


def body(node="n1", k=1, **over):
    data = {
        "request_id": "http-req-1",
        "node_id": node,
        "name": f"node {node}",
        "public_key": key(k),
        "listen_port": 51820,
        "join_token": "mvj_good",
        "epoch": 1,
    }
    data.update(over)
    return data


def test_register_then_read(client):
    r = client.post("/v1/register", json=body())
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["ok"] and reply["mesh_ip"] == "10.8.0.1" and reply["broker_password"]
    again = client.post("/v1/register", json=body(join_token=None, epoch=2)).json()
    assert again["mesh_ip"] == "10.8.0.1" and again["broker_password"] is None  # credentials only once
    nodes = client.get("/v1/nodes").json()
    assert [n["node_id"] for n in nodes] == ["n1"] and nodes[0]["epoch"] == 2
    assert client.get("/v1/nodes/n1").json()["state"] == "active"
    assert client.get("/v1/nodes/zz").status_code == 404
    mesh = client.get("/v1/mesh").json()
    assert mesh["revision"] == 1 and mesh["members"] == 1 and mesh["settings"]["network"] == "10.8.0.0/29"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (body(join_token="bad"), 403, "invalid_token"),
        (body(join_token=None), 403, "invalid_token"),
        (body(public_key="AAAA"), 400, "invalid_key"),
        (body(listen_port=0), 400, "invalid_request"),
    ],
)
def test_register_refusals(client, data, status, code):
    r = client.post("/v1/register", json=data)
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_register_conflict_and_garbage(client):
    assert client.post("/v1/register", json=body()).status_code == 200
    r = client.post("/v1/register", json=body(k=2))
    assert r.status_code == 409 and r.json()["error"]["code"] == "key_conflict"
    assert client.post("/v1/register", content=b"not json").status_code == 400


def test_pool_exhausted(client):
    for n in range(6):  # a /29 has 6 host addresses
        assert client.post("/v1/register", json=body(f"n{n}", n + 1)).status_code == 200
    r = client.post("/v1/register", json=body("n9", 99))
    assert r.status_code == 503 and r.json()["error"]["code"] == "pool_exhausted"


ADMIN_ROUTES = [
    ("DELETE", "/v1/nodes/n1"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens"),
    ("DELETE", "/v1/tokens/abc"),
]


def test_admin_needs_token(client):
    # one service for the whole table: each fixture start/stop costs about a second
    for method, path in ADMIN_ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
            assert client.request(method, path, headers=headers, json={}).status_code == 401, (
                method,
                path,
                headers,
            )


def test_admin_tokens_and_delete(client):
    created = client.post("/v1/tokens", json={"reusable": False, "ttl_s": 60}, headers=AUTH)
    assert created.status_code == 201
    secret, tid = created.json()["token"], created.json()["id"]
    listed = client.get("/v1/tokens", headers=AUTH).json()
    assert tid in [t["id"] for t in listed] and all("token" not in t for t in listed)
    assert client.post("/v1/register", json=body("n5", 5, join_token=secret)).status_code == 200
    r = client.post("/v1/register", json=body("n6", 6, join_token=secret))
    assert r.json()["error"]["code"] == "token_used"
    assert client.delete(f"/v1/tokens/{tid}", headers=AUTH).status_code == 204
    assert client.delete(f"/v1/tokens/{tid}", headers=AUTH).status_code == 404
    assert client.delete("/v1/nodes/n5", headers=AUTH).status_code == 204
    assert client.delete("/v1/nodes/n5", headers=AUTH).status_code == 404
    # its key is free again, its IP quarantined: the same key under a new id gets another address
    r = client.post("/v1/register", json=body("n7", 5))
    assert r.status_code == 200 and r.json()["mesh_ip"] != "10.8.0.1"


def test_health_metrics_openapi(client, service):
    client.post("/v1/register", json=body())
    client.post("/v1/register", json=body(join_token="bad", node="n2", k=2))
    # no broker listens: alive, not ready
    assert client.get("/healthz").json() == {"ok": True, "ready": False, "broker_connected": False, "revision": 1}
    text = client.get("/metrics").text
    assert 'meshvpn_registrar_members{state="active"} 1' in text
    assert "meshvpn_registrar_registrations_total 1" in text
    assert "meshvpn_registrar_registrations_refused_total 1" in text
    assert "meshvpn_registrar_internal_errors_total 0" in text
    assert "meshvpn_registrar_revision 1" in text
    for key in service.counters:  # every counter the service keeps is exported
        spec = next(s for s in COUNTERS if s.key == key)
        assert f"\nmeshvpn_registrar_{spec.metric} " in text
    spec = client.get("/openapi.json").json()
    assert "/v1/register" in spec["paths"] and spec["paths"]["/v1/register"]["post"]["description"]
    assert client.get("/docs").status_code == 200


def test_real_server(service):
    server = HttpServer(create_app(service, admin_token=ADMIN), host="127.0.0.1", port=0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        r = httpx.post(f"{base}/v1/register", json=body(), timeout=10)
        assert r.status_code == 200 and r.json()["mesh_ip"] == "10.8.0.1"
        assert httpx.get(f"{base}/v1/nodes/n1", timeout=10).json()["name"] == "node n1"
    finally:
        server.stop()
