"""The lab's only contact with the operating system: ip/nft commands, namespaces and detached processes.

Everything here is a thin, idempotent wrapper: creating what exists or deleting what is gone is success, so
`down` can run any number of times and after a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from meshlab.errors import CommandError
from meshlab.state import ProcessRecord

log = logging.getLogger(__name__)

WG_SOCKET_DIR = Path("/var/run/wireguard")


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, env: Mapping[str, str] | None = None,
        input_text: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion and capture its output; CommandError naming it if it fails and `check`."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env,
                              input=input_text, check=False, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def ns_argv(namespace: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` run inside `namespace` (ip netns exec execs it in place, so the pid is the command's own)."""
    return ["ip", "netns", "exec", namespace, *argv] if namespace else list(argv)


# --- namespaces and links ---------------------------------------------------------------------------------


def list_namespaces() -> list[str]:
    """Names of all named network namespaces."""
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_namespace(name: str) -> None:
    """Create namespace `name` (no error if it exists) with its loopback up."""
    if name not in list_namespaces():
        run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete_namespace(name: str) -> None:
    """Kill every process left in namespace `name`, then delete it (its interfaces go with it)."""
    if name not in list_namespaces():
        return
    kill_namespace_processes(name, signal.SIGKILL)
    run(["ip", "netns", "del", name], check=False)


def namespace_pids(name: str) -> list[int]:
    """Pids of the processes inside namespace `name` (empty if it does not exist)."""
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def kill_namespace_processes(name: str, sig: signal.Signals, *, wait_s: float = 5.0) -> list[int]:
    """Send `sig` to every process in namespace `name` and wait (up to `wait_s`) until it took effect: gone for
    SIGKILL, stopped for SIGSTOP, running again for SIGCONT. Returns the pids.

    A signal is only pending until its process is scheduled; on a loaded machine that takes a while, and whoever
    looks at the node next (a check reading its wireguard-go) must find it frozen or running, not in between.
    """
    pids = namespace_pids(name)
    for pid in pids:
        signal_pid(pid, sig)
    done = {
        signal.SIGKILL: lambda pid: not pid_alive(pid),
        signal.SIGSTOP: lambda pid: process_state(pid) in (None, "T", "t", "Z", "X"),
        signal.SIGCONT: lambda pid: process_state(pid) not in ("T", "t"),
    }.get(sig)
    if done is not None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not all(done(pid) for pid in pids):
            time.sleep(0.02)
    return pids


def namespace_frozen(name: str) -> bool:
    """True if any process in namespace `name` is stopped (only a lab freeze stops them)."""
    return any(process_state(pid) in ("T", "t") for pid in namespace_pids(name))


def stable_mac(name: str) -> str:
    """A locally administered unicast MAC derived from `name`: the same name, the same address."""
    digest = hashlib.sha256(name.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def add_bridge(namespace: str, bridge: str, address: str) -> None:
    """Create bridge `bridge` in `namespace` with `address` (CIDR) and a fixed MAC, and bring it up.

    Without a MAC of its own a Linux bridge takes the lowest MAC of its ports, so adding a node can change the
    MAC behind the control plane's address: every node's ARP entry for the broker is then stale, and their
    MQTT traffic stalls for seconds (heartbeats lost, members expired by mistake) until ARP notices.
    """
    if run(["ip", "-n", namespace, "link", "show", bridge], check=False).returncode != 0:
        run(["ip", "-n", namespace, "link", "add", bridge, "address", stable_mac(bridge), "type", "bridge"])
    run(["ip", "-n", namespace, "addr", "replace", address, "dev", bridge])
    run(["ip", "-n", namespace, "link", "set", bridge, "up"])


def add_node_link(*, node_ns: str, ifname: str, address: str, bridge_ns: str, bridge: str, port: str) -> None:
    """A veth from `node_ns` (named `ifname`, with `address`) to a port `port` of `bridge` in `bridge_ns`."""
    if run(["ip", "-n", node_ns, "link", "show", ifname], check=False).returncode != 0:
        run(["ip", "-n", node_ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", bridge_ns])
    run(["ip", "-n", bridge_ns, "link", "set", port, "master", bridge])
    run(["ip", "-n", bridge_ns, "link", "set", port, "up"])
    run(["ip", "-n", node_ns, "addr", "replace", address, "dev", ifname])
    run(["ip", "-n", node_ns, "link", "set", ifname, "up"])


def set_link(namespace: str, ifname: str, *, up: bool) -> None:
    """Set a link up or down (a partition cuts a node's only underlay link)."""
    run(["ip", "-n", namespace, "link", "set", ifname, "up" if up else "down"])


def delete_link(namespace: str, ifname: str) -> None:
    """Delete `ifname` in `namespace` (a veth takes its peer with it); nothing to do if it is gone."""
    run(["ip", "-n", namespace, "link", "del", ifname], check=False)


def readdress(namespace: str, ifname: str, address: str) -> None:
    """Make `address` (CIDR) the only address of `ifname`: the old one goes, as when a DHCP lease changes."""
    run(["ip", "-n", namespace, "addr", "flush", "dev", ifname])
    run(["ip", "-n", namespace, "addr", "add", address, "dev", ifname])


def set_default_route(namespace: str, ifname: str, gateway: str) -> None:
    """Route everything not on a connected subnet via `gateway` (gone whenever the link goes down)."""
    run(["ip", "-n", namespace, "route", "replace", "default", "via", gateway, "dev", ifname])


def enable_forwarding(namespace: str) -> None:
    """Let `namespace` route IPv4 between its interfaces (the sysctl is per namespace: the host's is untouched)."""
    run(["ip", "netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1"])


def nft_apply(namespace: str, script: str) -> None:
    """Load an `nft -f` script inside `namespace`."""
    run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input_text=script)


def nft_list_table(namespace: str, family: str, table: str) -> str:
    """`nft list table` inside `namespace` (with counters); empty if the table or the namespace is gone."""
    return run(["ip", "netns", "exec", namespace, "nft", "list", "table", family, table], check=False).stdout


def nft_delete_table(namespace: str, family: str, table: str) -> bool:
    """Delete an nftables table inside `namespace`; False if it (or the namespace) was already gone."""
    if namespace not in list_namespaces():
        return False
    return run(["ip", "netns", "exec", namespace, "nft", "delete", "table", family, table],
               check=False).returncode == 0


def link_up(namespace: str, ifname: str) -> bool:
    """True if `ifname` in `namespace` is administratively up."""
    out = run(["ip", "-n", namespace, "-o", "link", "show", ifname], check=False).stdout
    return "<" in out and ",UP" in out.split(">")[0] + ","


def listening(namespace: str, port: int) -> bool:
    """True if a TCP socket listens on `port` in `namespace`."""
    out = run(["ip", "netns", "exec", namespace, "ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def remove_wg_sockets(prefix: str) -> list[str]:
    """Delete wireguard-go UAPI sockets whose interface name starts with `prefix` (left by killed processes)."""
    removed = []
    if WG_SOCKET_DIR.is_dir():
        for sock in WG_SOCKET_DIR.glob(f"{prefix}*.sock"):
            sock.unlink(missing_ok=True)
            removed.append(sock.name)
    return removed


# --- processes --------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    return [raw[: raw.index("(")].strip(), "comm", *raw[raw.rindex(")") + 2:].split()]


def start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (None if gone): with the pid it names one process."""
    fields = _stat_fields(pid)
    return int(fields[21]) if fields else None


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (R, S, T, Z, ...), None if there is no such process."""
    _reap(pid)
    fields = _stat_fields(pid)
    return fields[2] if fields else None


def _reap(pid: int) -> None:
    # A process this Python started (tests, the demo) stays a zombie until waited for.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    state = process_state(pid)
    return state is not None and state != "Z"


def record_state(record: ProcessRecord | None) -> str:
    """running, frozen or stopped for a recorded process (stopped also when its pid now names another one)."""
    if record is None or start_ticks(record.pid) != record.start_ticks:
        return "stopped"
    state = process_state(record.pid)
    if state is None or state in ("Z", "X"):
        return "stopped"
    return "frozen" if state in ("T", "t") else "running"


def signal_pid(pid: int, sig: signal.Signals) -> bool:
    """Send `sig` to `pid`; False if it is gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def signal_record(record: ProcessRecord | None, sig: signal.Signals) -> bool:
    """Send `sig` to a recorded process if it is still that process; False if it is gone."""
    if record is None or start_ticks(record.pid) != record.start_ticks:
        return False
    return signal_pid(record.pid, sig)


def spawn(argv: Sequence[str], *, namespace: str | None, log_path: Path, env: Mapping[str, str],
          cwd: Path | None = None, stdout_path: Path | None = None) -> ProcessRecord:
    """Start `argv` detached (own session, stdin from /dev/null) in `namespace`.

    Its output is appended to `log_path`; with `stdout_path`, stdout goes there instead and only stderr to
    `log_path` (a command whose stdout is for machines, such as `meshchat listen --json`).
    """
    full = ns_argv(namespace, argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as files:
        err = files.enter_context(open(log_path, "ab"))
        out = files.enter_context(open(stdout_path, "ab")) if stdout_path is not None else err
        devnull = files.enter_context(open(os.devnull, "rb"))
        try:
            proc = subprocess.Popen(full, stdin=devnull, stdout=out, stderr=err, env=dict(env),
                                    cwd=cwd, start_new_session=True, close_fds=True)
        except OSError as exc:
            raise CommandError(f"cannot start {' '.join(full)}: {exc}") from exc
    proc.returncode = 0  # detached: the lab tracks and reaps it by pid, so Popen must not warn "still running"
    ticks = start_ticks(proc.pid)
    if ticks is None:
        raise CommandError(f"{' '.join(full)} exited at once; see {log_path}")
    return ProcessRecord(pid=proc.pid, start_ticks=ticks, argv=list(full), log=str(log_path))


def exec_replacing(argv: Sequence[str], *, env: Mapping[str, str]) -> NoReturn:
    """Replace this process with `argv`. It keeps our pid, terminal and process group, so every signal sent to
    us (Ctrl-C, a supervisor's SIGTERM) reaches it, and its exit status is the one our caller sees."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as exc:
        raise CommandError(f"cannot run {' '.join(argv)}: {exc}") from exc


def stop_record(record: ProcessRecord | None, *, timeout_s: float = 10.0) -> bool:
    """SIGTERM (after SIGCONT, in case it is frozen) and wait; SIGKILL after `timeout_s`. True if it had run."""
    if record is None or record_state(record) == "stopped":
        return False
    signal_record(record, signal.SIGCONT)
    signal_record(record, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if record_state(record) == "stopped":
            return True
        time.sleep(0.05)
    log.warning("pid %s ignored SIGTERM for %.0f s; killing it", record.pid, timeout_s)
    signal_record(record, signal.SIGKILL)
    while record_state(record) != "stopped" and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    return True


def comm(pid: int) -> str | None:
    """The command name of `pid`."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
