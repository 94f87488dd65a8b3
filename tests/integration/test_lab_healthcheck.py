"""`python -m meshlab.healthcheck URL`, which the lab runs inside its control namespace to ask the registrar's /healthz.

Here against a small HTTP server on 127.0.0.1: a JSON object is printed (also for a non-2xx answer, which still
says why), anything else is exit 1 with the reason on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from brokers import free_port

REPO = Path(__file__).resolve().parents[2]
ANSWERS = {
    "/healthz": (200, b'{"ok": true, "ready": true, "broker_connected": true, "revision": 4}'),
    "/starting": (503, b'{"ok": true, "ready": false}'),
    "/html": (200, b"<html>not json</html>"),
    "/list": (200, b"[1, 2]"),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        status, body = ANSWERS.get(self.path, (404, b""))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def healthcheck(url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "meshlab.healthcheck", url, "--timeout", "2"], capture_output=True,
                          text=True, timeout=30, env=env)


@pytest.mark.parametrize(("path", "ready"), [("/healthz", True), ("/starting", False)])
def test_json_body_is_printed(server, path, ready):
    result = healthcheck(server + path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ready"] is ready


@pytest.mark.parametrize("path", ["/html", "/list", "/missing"])
def test_anything_but_a_json_object_is_exit_1(server, path):
    result = healthcheck(server + path)
    assert result.returncode == 1
    assert result.stdout == "" and server + path in result.stderr


def test_nothing_listening_is_exit_1():
    result = healthcheck(f"http://127.0.0.1:{free_port()}/healthz")
    assert result.returncode == 1
    assert "healthcheck:" in result.stderr
