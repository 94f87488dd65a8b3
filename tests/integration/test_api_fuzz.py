"""Fuzzing every endpoint of the registrar's HTTP API, derived from its own OpenAPI schema (tests/fuzzing_http.py
has the requests and the properties): no 5xx, no echo of the input, no change from a refused or unauthenticated
request. A bounded, derandomized run; bench/bench_fuzz.py runs the same with a large budget.
"""

from __future__ import annotations

import contextlib
import socket

import pytest
from brokers import free_port
from fuzzing_http import ADMIN, ApiHarness, Request, check_response, operations, requests_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registrar.httpserver import HttpServer

CI = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def harness():
    running = ApiHarness(broker_port=free_port())
    try:
        yield running
    finally:
        running.close()


def test_the_schema_has_every_route(harness) -> None:
    """The fuzzer reaches what the app serves: every route is in the schema it is derived from."""

    def routes(router):
        for route in router.routes:
            included = getattr(route, "original_router", None)  # FastAPI keeps an included router whole
            yield from routes(included) if included is not None else [route]

    served = {(m, r.path) for r in routes(harness.client.app) for m in getattr(r, "methods", ())}
    served -= {(m, p) for m, p in served if m == "HEAD" or p.startswith(("/docs", "/redoc", "/openapi"))}
    described = {(op.method, op.path) for op in operations(harness.spec)}
    assert served == described and len(described) >= 15


def test_fuzz_every_endpoint(harness) -> None:
    CI(given(requests_for(harness.spec))(lambda request: check_response(harness, request)))()
    assert harness.requests >= CI.max_examples


ADMIN_AUTH = [(b"authorization", f"Bearer {ADMIN}".encode())]


@pytest.mark.parametrize(
    ("method", "path", "headers", "content", "hostile"),
    [
        ("POST", "/v1/enroll", [], b'{"node_id": "n5", "name": "x", "listen_port": NaN}', ()),
        ("GET", "/v1/nodes/%E2%80%AEevil", ADMIN_AUTH, b"", ("\u202eevil",)),
        ("DELETE", "/v1/tokens/%00%0A%1B%5B31m", ADMIN_AUTH, b"", ("\x00\n\x1b[31m",)),
        ("POST", "/v1/tokens", ADMIN_AUTH, b'{"ttl_s": 1e999}', ()),
        ("POST", "/v1/register", [(b"authorization", "Basic \u00e9".encode("latin-1"))], b"{}", ()),
    ],
)
def test_examples_the_fuzzer_covers(harness, method, path, headers, content, hostile) -> None:
    check_response(harness, Request(method, path, [], headers, content, "none", hostile))


# ---- the real server: malformed HTTP on the wire -----------------------------------------------------------------

REQUEST_LINES = [b"GET /healthz HTTP/1.1", b"POST /v1/enroll HTTP/1.1", b"POST /v1/register HTTP/1.1",
                 b"GET /v1/nodes/n1 HTTP/1.1", b"DELETE /v1/tokens/x HTTP/1.1", b"POST /v1/tokens HTTP/1.0"]
ODD_LINES = [b"GET /v1/info HTTP/9.9", b"GET  /healthz HTTP/1.1", b"GET /\xff\xfe HTTP/1.1", b"G\x00T / HTTP/1.1",
             b"GET /v1/nodes/%00%E2%80%AE HTTP/1.1", b"GET", b"", b"POST /v1/enroll?" + b"a=" * 5000 + b" HTTP/1.1"]
HEADERS = [b"Content-Type: application/json", b"Content-Type: text/plain", b"Authorization: Bearer x",
           b"Authorization: Basic \xe9\xe9", b"Authorization: Basic bjE6\x00", b"Accept: */*", b"Connection: close",
           b"Expect: 100-continue", b"X-Forwarded-For: 10.0.0.1, \xff"]
ODD_HEADERS = [b"Content-Length: -1", b"Content-Length: abc", b"Content-Length: 99999999999999999999",
               b"Content-Length: 1, 2", b"Content-Length: 3", b"Transfer-Encoding: chunked",
               b"Transfer-Encoding: gzip, chunked", b" folded: header", b"Bad Header: x", b"X-Nul: a\x00b",
               b"X-Long: " + b"a" * 70_000, b"Connection: upgrade", b"Upgrade: websocket", b"Host: x"]
BODIES = [b"0\r\n\r\n", b"zz\r\nabc\r\n", b"5\r\n{}{}{\r\n0\r\n\r\n", b'{"node_id":1}', b"[" * 100_000, b"{}"]


@st.composite
def raw_requests(draw) -> bytes:
    """HTTP/1.1 on the wire: mostly well-framed requests with something odd in them, sometimes any bytes."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=200))
    line = draw(st.sampled_from(REQUEST_LINES if draw(st.integers(0, 3)) else ODD_LINES))
    body = draw(st.one_of(st.sampled_from(BODIES), st.binary(max_size=64)))
    headers = [b"Host: x"] if draw(st.integers(0, 5)) else []
    if draw(st.integers(0, 2)):
        headers.append(b"Content-Length: %d" % len(body))
    headers += draw(st.lists(st.sampled_from(HEADERS), max_size=3))
    headers += draw(st.lists(st.sampled_from(ODD_HEADERS), max_size=2))
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


@pytest.fixture(scope="module")
def server(harness):
    running = HttpServer(harness.app, host="127.0.0.1", port=0)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _exchange(port: int, data: bytes) -> bytes:
    """Send `data` and return what the server answers (up to the end of its headers).

    A request that claims more than it sends would leave the server waiting: when no answer comes soon, end our
    side of the connection (a late answer to a complete request is then missed, never misjudged)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        answer = b""
        with contextlib.suppress(OSError):  # the server may refuse and close before it has read everything
            sock.sendall(data)
            sock.settimeout(0.5)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(5)
                answer = sock.recv(65536)
            sock.settimeout(5)
            while answer and b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        return answer


def test_fuzz_the_real_server_with_malformed_http(harness, server) -> None:
    """uvicorn, the body limit and the app under malformed requests: an answer, if any, is never a 5xx, nothing
    changes, and the server serves on."""

    @settings(CI, max_examples=60)
    @given(raw_requests())
    def check(data: bytes) -> None:
        harness.reset()
        before = harness.seen()
        answer = _exchange(server.port, data)
        status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.") and answer.count(b" ") >= 2 else b""
        assert not status.startswith(b"5"), f"{answer[:300]!r} for {data[:300]!r}"
        assert harness.seen() == before, f"{data[:300]!r} changed the state"

    check()
    assert b" 200 " in _exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
