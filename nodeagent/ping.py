"""Ping a peer's mesh IP with the system `ping`. `parse_ping_output` is pure; `SystemPinger` runs the tool."""

from __future__ import annotations

import logging
import re
import subprocess
from typing import Protocol

from nodeagent.errors import AgentError

log = logging.getLogger(__name__)

# iputils and busybox both print "... icmp_seq=N ttl=T time=X ms" (busybox: "seq=N").
_REPLY_RE = re.compile(r"(?:icmp_)?seq=(\d+)\b.*?time[=<]\s*([\d.]+)\s*ms")


def parse_ping_output(text: str, *, count: int) -> list[float | None]:
    """Round trips in ms for probes 1..count from ping's output; None for a probe without a reply.

    iputils numbers probes from 1, busybox from 0; duplicates (DUP!) keep the first reply.
    """
    replies: dict[int, float] = {}
    for match in _REPLY_RE.finditer(text):
        replies.setdefault(int(match.group(1)), float(match.group(2)))
    first = 0 if 0 in replies else 1
    return [replies.get(first + i) for i in range(count)]


class Pinger(Protocol):
    """Sends `count` echo requests to `ip` and returns the round trips (None = lost)."""

    def ping(self, ip: str, *, count: int) -> list[float | None]: ...


class SystemPinger:
    """Runs `ping -c N -W 1 -i 0.2 IP` (iputils). Blocks for up to about count + 1 seconds."""

    def ping(self, ip: str, *, count: int) -> list[float | None]:
        cmd = ["ping", "-n", "-c", str(count), "-W", "1", "-i", "0.2", ip]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=count + 5, check=False)
        except FileNotFoundError as exc:
            raise AgentError("the ping tool is not installed (apt-get install iputils-ping)") from exc
        except subprocess.TimeoutExpired as exc:
            raise AgentError(f"ping {ip} did not finish in time") from exc
        # Exit status 1 means "no reply": that is a result, not an error. 2 means ping itself failed.
        if done.returncode not in (0, 1):
            raise AgentError(f"ping {ip} failed: {done.stderr.strip() or done.returncode}")
        return parse_ping_output(done.stdout, count=count)
