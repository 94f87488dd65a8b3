"""The VM test's agent inside the guest: runs the host's commands from a virtio-serial port, one at a time.

Built into the guest image (tests/vm/image.py) and started by its own systemd unit as soon as the port
appears. Python 3 standard library only: it runs on the guest's Debian python3, before meshvpn is installed.

Protocol: one JSON object per line in each direction. The host sends requests
    {"id": N, "op": "run", "argv": [...], "timeout": S, "env": {...}, "stdin": "..."}
    {"id": N, "op": "write", "path": P, "data": BASE64, "mode": 0o644}
    {"id": N, "op": "read", "path": P}
    {"id": N, "op": "ping"}
and gets exactly one reply each, {"id": N, "ok": true, ...} or {"id": N, "ok": false, "error": "..."}.
A `run` reply carries rc (None after the timeout killed the command), stdout, stderr and seconds.
The agent sends nothing on its own: the host's first ping waits in the port until the agent reads it,
whatever the order in which host and guest come up.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

PORT = "/dev/virtio-ports/org.meshvpn.vmtest"
MAX_OUTPUT = 4 * 1024 * 1024


def _run(request: dict) -> dict:
    env = dict(os.environ)
    env.update(request.get("env") or {})
    start = time.monotonic()
    # A session of its own, so a timeout kills the command and everything it started.
    proc = subprocess.Popen(
        request["argv"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=request.get("cwd") or "/",
        start_new_session=True,
    )
    rc: int | None
    try:
        out, err = proc.communicate((request.get("stdin") or "").encode(), timeout=request.get("timeout", 60))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    return {
        "rc": rc,
        "stdout": out[-MAX_OUTPUT:].decode(errors="replace"),
        "stderr": err[-MAX_OUTPUT:].decode(errors="replace"),
        "seconds": round(time.monotonic() - start, 3),
    }


def _write(request: dict) -> dict:
    path = request["path"]
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    tmp = f"{path}.vmtest-tmp"
    with open(tmp, "wb") as f:
        f.write(base64.b64decode(request["data"]))
    os.chmod(tmp, request.get("mode", 0o644))
    os.replace(tmp, path)
    return {}


def _read(request: dict) -> dict:
    with open(request["path"], "rb") as f:
        return {"data": base64.b64encode(f.read()).decode()}


HANDLERS = {"run": _run, "write": _write, "read": _read, "ping": lambda request: {"pid": os.getpid()}}


def handle(line: bytes) -> dict:
    """The reply to one request line. Never raises: a broken request gets an error reply."""
    try:
        request = json.loads(line)
    except ValueError as exc:
        return {"id": None, "ok": False, "error": f"not JSON: {exc}"}
    try:
        reply = HANDLERS[request["op"]](request)
    except Exception as exc:  # noqa: BLE001 - the reply carries the error to the host, which raises it
        return {"id": request.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"id": request.get("id"), "ok": True, **reply}


def _send(channel, data: bytes) -> None:
    # An unbuffered write to a character device may take only part of a large reply.
    view = memoryview(data)
    while view:
        view = view[channel.write(view):]


def _wait_for_port(path: str, timeout: float) -> None:
    # virtio_console announces the host's ports shortly after it loads; udev then makes the named link.
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"guest agent: {path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def main() -> int:
    port = PORT
    _wait_for_port(port, 60)
    with open(port, "r+b", buffering=0) as channel:
        pending = b""
        while True:
            chunk = channel.read(65536)
            if not chunk:
                # The host closed its end; systemd restarts us (Restart=always) for the next connection.
                return 0
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip():
                    _send(channel, json.dumps(handle(line)).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())
