"""Traffic on a lab's mesh: commands run on a node, ping, the TCP echo probe, and a continuous ping.

A command run on a node (`meshlab exec`, or any probe here) runs inside the node's network namespace with
MESHVPN_SOCKET naming that node's agent socket, so `meshctl` and `meshchat` talk to the node's own agent
without flags, exactly as they would on a machine of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from meshlab import system
from meshlab.context import CONTROL_NODE, LabContext, child_env
from meshlab.errors import CommandError
from meshlab.meshview import parse_ping_summary
from meshlab.state import ProcessRecord
from meshlab.waiting import wait_for

PROBE_PORT = 7901  # the TCP echo probe every node runs (meshlab.probe)
SOCKET_ENV = "MESHVPN_SOCKET"  # read by meshctl and meshchat


class Traffic:
    """Runs commands and probes on a lab's nodes."""

    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx

    def command(self, name: str, argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """The full argv and environment that run `argv` on node `name` (`ctl`: the control namespace)."""
        env = dict(os.environ)
        if name == CONTROL_NODE:
            namespace = self.ctx.state().control.namespace
        else:
            namespace = self.ctx.node(name).namespace
            env[SOCKET_ENV] = str(self.ctx.store.agent_socket(name))
        return system.ns_argv(namespace, _resolve(argv)), env

    def exec(self, name: str, argv: Sequence[str], *, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` on node `name` (`ctl` for the control namespace) to completion, capturing its output."""
        full, env = self.command(name, argv)
        try:
            return subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandError(f"{' '.join(full)}: {exc}") from exc

    def exec_in_place(self, name: str, argv: Sequence[str]) -> NoReturn:
        """Become `argv` run on node `name`: signals, the terminal and the exit status are then the command's own."""
        full, env = self.command(name, argv)
        system.exec_replacing(full, env=env)

    def ping(self, src: str, dst: str, *, count: int = 1, wait_s: float = 1.0) -> bool:
        """One ICMP echo (or `count`) from node `src` to node `dst`'s mesh IP; True if any reply came back."""
        proc = self.exec(src, ["ping", "-n", "-q", "-c", str(count), "-W", str(wait_s), self.ctx.mesh_ip(dst)],
                         timeout=count * wait_s + 5)
        return proc.returncode == 0

    def tcp(self, src: str, dst: str, *, timeout_s: float = 2.0) -> bool:
        """A TCP connection from `src` to `dst`'s echo probe on its mesh IP, with one line echoed back."""
        proc = self.exec(src, [sys.executable, "-m", "meshlab.probe", "connect", self.ctx.mesh_ip(dst),
                               str(PROBE_PORT), "--timeout", str(timeout_s)], timeout=timeout_s + 10)
        return proc.returncode == 0

    def start_pinger(self, src: str, dst: str, *, interval_s: float = 0.2, stamped: bool = False) -> ContinuousPing:
        """Continuous ping from `src` to `dst` until `.stop()`; the result counts sent and received.

        `stamped` adds `-D -O`: every line carries its unix time and every probe without a reply by the next
        send is named (meshview.new_losses reads which were lost, and when, while ping still runs).
        """
        log_path = self.ctx.store.root / "traffic" / f"ping-{src}-{dst}-{int(time.time() * 1000)}.log"
        argv = ["ping", "-n", *(["-D", "-O"] if stamped else []), "-i", str(interval_s), "-W", "1",
                self.ctx.mesh_ip(dst)]
        record = system.spawn(argv, namespace=self.ctx.node(src).namespace, log_path=log_path, env=child_env())
        return ContinuousPing(record)


class ContinuousPing:
    """A running `ping` between two nodes; `stop()` ends it with SIGINT and returns (sent, received)."""

    def __init__(self, record: ProcessRecord) -> None:
        self.record = record

    def output(self) -> str:
        """What ping printed so far."""
        try:
            return Path(self.record.log).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> tuple[int, int]:
        system.signal_record(self.record, signal.SIGINT)
        wait_for(lambda: system.record_state(self.record) == "stopped", timeout=5, what="ping summary",
                 interval=0.05)
        return parse_ping_summary(Path(self.record.log).read_text())


def _resolve(argv: Sequence[str]) -> list[str]:
    # `meshlab exec n1 -- meshctl status` under sudo: the venv's console scripts are often not on root's PATH,
    # but they are next to the Python running meshlab. A command found on PATH keeps its PATH meaning.
    out = list(argv)
    if out and "/" not in out[0] and shutil.which(out[0]) is None:
        beside = Path(sys.executable).parent / out[0]
        if beside.exists():
            out[0] = str(beside)
    return out
