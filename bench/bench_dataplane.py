"""Data-plane cost of the agent: iperf3 over the agent's wireguard-go interface vs ones set up by hand beside it.

    sudo .venv/bin/python bench/bench_dataplane.py [--rounds 30] [--seconds 3] [--json FILE]

One lab of two nodes (real agents with the userspace backend, embedded broker, heartbeat 1 s, the agents'
default 10 s drift repair). Beside each agent's interface `mv-<id>-<i>` (mesh 100.96.0.0/16, port 51820) the
bench starts more wireguard-go daemons and configures them by hand with `ip` and `wg set`: same namespaces,
same underlay, same binary, their own names, ports and addresses. One iperf3 server per interface runs in n2;
from n1 one TCP stream of --seconds goes to each interface's peer address.

Interfaces compared ("kinds"), chosen with --hand (comma-separated, first one is the reference):
  agent        the agent's own interface (wireguard-go started by the agent, detached in a session of its own)
  hand         by hand, wireguard-go started detached in a session of its own, as the agent starts it
  hand-shell   by hand, wireguard-go started in this bench's session, which also runs iperf3: what
               `wireguard-go wg1` typed in the shell that then runs iperf3 gives. Linux's autogroup scheduler
               (/proc/sys/kernel/sched_autogroup_enabled) shares CPU time between sessions, so this daemon is
               scheduled together with the iperf3 processes it carries packets for.
  hand-keepalive  as hand, plus the persistent keepalive the mesh gives every peer (25 s)

Phases (--phases), each of --rounds rounds with one run per interface:
  running   the agents as the lab runs them
  stopped   both agents SIGSTOPped (their wireguard-go daemons run on): what is left is how the interface was
            set up, not anything the agent does while it runs
--mode alternate (default) runs one interface at a time, in every order in turn (agent, hand; hand, agent;
...): on a shared machine a run's speed depends on what ran just before it and on what the neighbours do,
so only runs taken side by side, in every order, compare. --mode concurrent runs every interface at the same
time: both streams then see the same neighbours and compete for the same CPUs, which magnifies any scheduling
difference between their daemons.

Reported per phase and interface: median Gbit/s (receiver side), p25-p75 and min-max, TCP retransmits, CPU
seconds per Gbit of the interface's two wireguard-go daemons, CPU seconds per run of the two agents; then for
each interface against the reference the ratio of medians and, per round, the median and p25-p75 of the ratios,
their geometric mean with a 95 % confidence interval, and the median split by which of the two ran first.

--iperf-session own starts each iperf3 (clients and servers) in a session of its own instead of the bench's.
--rate R (iperf3 -b, e.g. 100M) sends at a fixed rate below saturation: every interface then carries the same
traffic and "CPU s per Gbit" compares what a packet costs each daemon, whatever share of the CPUs it gets.
--uapi-poll-hz N reads the agent's interface in n1 over UAPI N times a second during the runs (the agent does it
once per reconcile pass, every 10 s): an amplifier that shows what UAPI reads cost the data plane.

Needs root, wireguard-go, wg, ip and iperf3. Everything it creates (lab, hand-made interfaces, iperf3 processes,
keys) is removed on exit, also on failure, Ctrl-C and SIGTERM; logs stay in the printed directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlab import system  # noqa: E402
from meshlab.context import child_env  # noqa: E402
from meshlab.errors import NotReadyError  # noqa: E402
from meshlab.lab import Lab, new_lab_id  # noqa: E402
from meshlab.settings import LabSettings  # noqa: E402
from meshlab.waiting import wait_for  # noqa: E402
from wgctl.userspace import UserspaceWireGuard  # noqa: E402


@dataclass(frozen=True, slots=True)
class HandKind:
    """How one hand-made interface pair is set up."""

    prefix: str  # interface names: <prefix>-<lab id>-<node index>
    port: int
    net: str  # its /24: .1 in n1, .2 in n2
    own_session: bool  # wireguard-go started detached in a session of its own, as the agent starts it
    keepalive: int = 0  # persistent keepalive, seconds (0: off, as `wg set` leaves it)


HAND_KINDS = {
    "hand": HandKind("wh", 51821, "100.97.0", own_session=True),
    "hand-shell": HandKind("ws", 51822, "100.98.0", own_session=False),
    "hand-keepalive": HandKind("wk", 51823, "100.99.0", own_session=True, keepalive=25),
}
IPERF_BASE_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Run:
    """One iperf3 run over one interface."""

    kind: str
    round: int
    position: int  # 0 = ran first in its round, 1 = second, ...; -1 = every interface at the same time
    seconds: float
    gbps: float  # receiver side
    retransmits: int
    wg_cpu_s: float  # both wireguard-go daemons of the interface, during the run
    agent_cpu_s: float  # both agents, during the run (0 when stopped)
    load1: float  # 1-minute load average at the end of the run


@dataclass(slots=True)
class Interface:
    """One interface pair under test: its names in n1 and n2, n2's address, its iperf3 port, its daemons."""

    kind: str
    names: tuple[str, str]
    target: str
    iperf_port: int
    pids: list[int] = field(default_factory=list)


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of `pids` (all their threads), in seconds; a vanished pid counts 0."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def wireguard_go_pid(ifname: str) -> int | None:
    """Pid of the wireguard-go daemon serving `ifname` (it daemonises, so the pid we started is not it)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if len(argv) >= 2 and argv[0].endswith(b"wireguard-go") and argv[-1] == ifname.encode():
            return int(entry.name)
    return None


def sh(namespace: str, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 30) -> str:
    """Run `argv` in `namespace`; its stdout (CommandError if it fails)."""
    return system.run(system.ns_argv(namespace, argv), input_text=input_text, timeout=timeout).stdout


class Bench:
    """The lab, the hand-made interfaces and the iperf3 servers; `close()` removes all of it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kinds: list[str] = ["agent", *args.hand.split(",")]
        self.tmp = Path(tempfile.mkdtemp(prefix="mldp."))
        self.lab = Lab(LabSettings(lab_dir=self.tmp / "lab", heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0))
        self.servers: list[subprocess.Popen[bytes]] = []
        self.clients: list[subprocess.Popen[str]] = []  # the iperf3 clients of the current run
        self.stopped_agents: list[int] = []
        self.interfaces: dict[str, Interface] = {}
        self.hand_names: list[str] = []
        self.namespaces: tuple[str, str] = ("", "")
        self.agent_pids: list[int] = []

    # -- set-up -------------------------------------------------------------------------------------------
    def up(self) -> None:
        lab_id = new_lab_id()
        self.lab.up(2, lab_id=lab_id)
        self.lab.wait_mesh(timeout=60)
        st = self.lab.state()
        n1, n2 = st.node("n1"), st.node("n2")
        assert n1.agent and n2.agent and n2.mesh_ip
        self.namespaces = (n1.namespace, n2.namespace)
        self.agent_pids = [n1.agent.pid, n2.agent.pid]
        for index, kind in enumerate(self.kinds):
            port = IPERF_BASE_PORT + index
            if kind == "agent":
                iface = Interface(kind, (n1.interface, n2.interface), n2.mesh_ip, port)
                iface.pids = [self._pid(name) for name in iface.names]
            else:
                how = HAND_KINDS[kind]
                iface = Interface(kind, (f"{how.prefix}-{lab_id}-1", f"{how.prefix}-{lab_id}-2"), f"{how.net}.2", port)
                self._hand_made(iface, (n1.underlay_ip, n2.underlay_ip))
            self.interfaces[kind] = iface
            with open(self.tmp / f"iperf3-{kind}.log", "wb") as log:
                self.servers.append(self._popen(n2.namespace, ["iperf3", "-s", "-p", str(port)],
                                                stdout=log, stderr=subprocess.STDOUT))
            wait_for(lambda p=port: system.listening(n2.namespace, p), timeout=10, what=f"iperf3 server on {port}")
        for kind, iface in self.interfaces.items():
            wait_for(lambda t=iface.target: self._ping(t), timeout=20, what=f"{kind} interface answers ping")

    def _popen(self, namespace: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(system.ns_argv(namespace, argv), stdin=subprocess.DEVNULL,
                                start_new_session=self.args.iperf_session == "own", **kwargs)

    def _pid(self, ifname: str) -> int:
        pid = wireguard_go_pid(ifname)
        if pid is None:
            raise RuntimeError(f"no wireguard-go serves {ifname}")
        return pid

    def _hand_made(self, iface: Interface, underlay: tuple[str, str]) -> None:
        """Two wireguard-go daemons configured with `ip` and `wg set`, as one would by hand."""
        how = HAND_KINDS[iface.kind]
        private = [system.run(["wg", "genkey"]).stdout.strip() for _ in range(2)]
        public = [system.run(["wg", "pubkey"], input_text=k + "\n").stdout.strip() for k in private]
        for i, (ns, name) in enumerate(zip(self.namespaces, iface.names, strict=True)):
            self.hand_names.append(name)
            # wireguard-go daemonises itself; its daemon stays in the session of whoever started it.
            subprocess.run(system.ns_argv(ns, ["wireguard-go", name]), env=child_env(), check=True, timeout=30,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=how.own_session)
            key_file = self.tmp / f"{name}.key"
            key_file.touch(mode=0o600)
            key_file.write_text(private[i] + "\n")
            other = 1 - i
            sh(ns, ["wg", "set", name, "private-key", str(key_file), "listen-port", str(how.port),
                    "peer", public[other], "allowed-ips", f"{how.net}.{other + 1}/32",
                    "endpoint", f"{underlay[other]}:{how.port}", "persistent-keepalive", str(how.keepalive)])
            sh(ns, ["ip", "address", "add", f"{how.net}.{i + 1}/24", "dev", name])
            sh(ns, ["ip", "link", "set", name, "up"])
            iface.pids.append(self._pid(name))

    def _ping(self, target: str) -> bool:
        argv = system.ns_argv(self.namespaces[0], ["ping", "-n", "-q", "-c1", "-W1", target])
        return system.run(argv, check=False, timeout=5).returncode == 0

    def describe(self) -> dict[str, dict[str, str]]:
        """`ip -d link`, `wg showconf` (keys left out) and how the daemon runs, for each interface in n1."""
        out: dict[str, dict[str, str]] = {}
        for kind, iface in self.interfaces.items():
            name, pid = iface.names[0], iface.pids[0]
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            out[kind] = {
                "link": sh(self.namespaces[0], ["ip", "-d", "link", "show", name]).replace(name, "IF").strip(),
                "wg": "\n".join(line for line in sh(self.namespaces[0], ["wg", "showconf", name]).splitlines()
                                if "Key" not in line).strip(),
                "session": stat[3], "nice": stat[16],
                "autogroup": Path(f"/proc/{pid}/autogroup").read_text().strip(),
                "cpus": next(line.split(":")[1].strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                             if line.startswith("Cpus_allowed_list")),
                "cgroup": Path(f"/proc/{pid}/cgroup").read_text().strip().replace("\n", " "),
                "environ": " ".join(sorted(v for v in environ if v.startswith(("WG_", "GO", "LOG_")))),
            }
        return out

    # -- measuring ----------------------------------------------------------------------------------------
    def phase(self, name: str) -> list[Run]:
        """--rounds rounds over every interface, one at a time in every order in turn (or all at once)."""
        runs: list[Run] = []
        together = self.args.mode == "concurrent"
        # Every order in turn (for two interfaces: AB, BA, AB, ...), so each pair ran first as often as second.
        orders = list(itertools.permutations(self.kinds))
        for r in range(self.args.rounds):
            order = list(orders[r % len(orders)])
            batches = [order] if together else [[kind] for kind in order]
            for batch in batches:
                for run in self._measure(batch, round_=r, position=-1 if together else order.index(batch[0])):
                    runs.append(run)
                    print(f"{name} round {r + 1}/{self.args.rounds} {run.kind:10s} {run.gbps:6.3f} Gbit/s  "
                          f"retr {run.retransmits:6d}  wg cpu {run.wg_cpu_s:5.2f} s  agents {run.agent_cpu_s:5.2f} s"
                          f"  load {run.load1:4.1f}", flush=True)
        return runs

    def _measure(self, kinds: Sequence[str], *, round_: int, position: int) -> list[Run]:
        ifaces = [self.interfaces[k] for k in kinds]
        wg_before = [cpu_seconds(i.pids) for i in ifaces]
        agents_before = cpu_seconds(self.agent_pids)
        clients = self.clients = [
            self._popen(self.namespaces[0], ["iperf3", "-c", i.target, "-p", str(i.iperf_port),
                                             "-t", str(self.args.seconds), "-J",
                                             *(["-b", self.args.rate] if self.args.rate else [])],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in ifaces
        ]
        outputs = [c.communicate(timeout=self.args.seconds + 30) for c in clients]
        agent_cpu = cpu_seconds(self.agent_pids) - agents_before
        runs = []
        for iface, client, (out, err), before in zip(ifaces, clients, outputs, wg_before, strict=True):
            report = json.loads(out) if out.strip() else {"error": err.strip()}
            if client.returncode != 0 or "error" in report:
                raise RuntimeError(f"iperf3 over {iface.kind} exited {client.returncode}: {report.get('error')}")
            end = report["end"]
            runs.append(Run(iface.kind, round_, position, self.args.seconds,
                            end["sum_received"]["bits_per_second"] / 1e9, int(end["sum_sent"].get("retransmits", 0)),
                            cpu_seconds(iface.pids) - before, agent_cpu, os.getloadavg()[0]))
        return runs

    def stop_agents(self) -> None:
        for pid in self.agent_pids:
            if system.signal_pid(pid, signal.SIGSTOP):
                self.stopped_agents.append(pid)
        wait_for(lambda: all(system.process_state(p) == "T" for p in self.stopped_agents), timeout=5,
                 what="agents stopped", interval=0.05)

    # -- clean-up -----------------------------------------------------------------------------------------
    def close(self) -> None:
        for pid in self.stopped_agents:
            system.signal_pid(pid, signal.SIGCONT)
        for proc in [*self.clients, *self.servers]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        wg = UserspaceWireGuard()
        for name in self.hand_names:
            pid = wireguard_go_pid(name)
            wg.socket_path(name).unlink(missing_ok=True)  # wireguard-go exits when its socket goes
            if pid is not None:
                try:
                    wait_for(lambda p=pid: not system.pid_alive(p), timeout=5, what=f"wireguard-go {name} exits",
                             interval=0.05)
                except NotReadyError:
                    system.signal_pid(pid, signal.SIGKILL)
        for key in self.tmp.glob("*.key"):
            key.unlink()
        self.lab.down()
        print(f"(logs kept in {self.tmp})")


class UapiPoller:
    """Reads an interface over UAPI `hz` times a second in a thread (the drift-repair read, amplified)."""

    def __init__(self, ifname: str, hz: float) -> None:
        self.ifname, self.period = ifname, 1.0 / hz
        self.stop = threading.Event()
        self.reads = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="uapi-poller")

    def _run(self) -> None:
        wg = UserspaceWireGuard()
        while not self.stop.wait(self.period):
            wg.read(self.ifname)
            self.reads += 1


# -- summary (pure) -----------------------------------------------------------------------------------------


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """(p25, p75) of `values` (a single value is its own spread)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def geometric_mean(ratios: Sequence[float]) -> dict[str, float]:
    """The geometric mean of per-round ratios and its 95 % confidence interval (normal approximation on the
    logarithms: rounds are paired runs, so neighbours' load, which hits both runs of a round, mostly cancels)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
    return {"geomean": math.exp(mean), "geomean_ci95": (math.exp(mean - half), math.exp(mean + half))}


def summary(runs: list[Run], kinds: Sequence[str]) -> dict[str, object]:
    """Per interface: medians and spread. Per interface against the reference (kinds[1]): the ratio of medians,
    the per-round ratios with their spread, split by which of the two ran first."""
    out: dict[str, object] = {}
    for kind in kinds:
        mine = [r for r in runs if r.kind == kind]
        gbps = [r.gbps for r in mine]
        out[kind] = {
            "median_gbps": statistics.median(gbps), "min_gbps": min(gbps), "max_gbps": max(gbps),
            "iqr_gbps": quartiles(gbps),
            "median_retransmits": statistics.median(r.retransmits for r in mine),
            "wg_cpu_s_per_gbit": statistics.median(r.wg_cpu_s / (r.gbps * r.seconds) for r in mine),
            "median_agent_cpu_s": statistics.median(r.agent_cpu_s for r in mine),
        }
    by_round = {(r.round, r.kind): r for r in runs}
    rounds = sorted({r.round for r in runs})
    reference = kinds[1]
    ratios: dict[str, object] = {}
    for kind in kinds:
        if kind == reference:
            continue
        pairs = [(by_round[(n, kind)], by_round[(n, reference)]) for n in rounds]
        per_round = [a.gbps / b.gbps for a, b in pairs]
        first = [a.gbps / b.gbps for a, b in pairs if a.position < b.position]
        second = [a.gbps / b.gbps for a, b in pairs if a.position > b.position]
        ratios[f"{kind}/{reference}"] = {
            "of_medians": out[kind]["median_gbps"] / out[reference]["median_gbps"],  # type: ignore[index]
            "median_round": statistics.median(per_round), "iqr_round": quartiles(per_round),
            **geometric_mean(per_round),
            "ran_first": statistics.median(first) if first else None,
            "ran_second": statistics.median(second) if second else None,
            "rounds": per_round,
        }
    out["ratios"] = ratios
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(name: str, s: dict, kinds: Sequence[str]) -> str:
    """A phase's summary as a markdown table and one line per ratio."""
    lines = [f"\n{name}",
             "| interface | median Gbit/s | p25-p75 | min-max | median TCP retransmits | wireguard-go CPU s per Gbit "
             "| agents' CPU s per run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind in kinds:
        k = s[kind]
        lines.append(f"| {kind} | {k['median_gbps']:.3f} | {k['iqr_gbps'][0]:.3f}-{k['iqr_gbps'][1]:.3f} | "
                     f"{k['min_gbps']:.3f}-{k['max_gbps']:.3f} | {k['median_retransmits']:.0f} | "
                     f"{k['wg_cpu_s_per_gbit']:.2f} | {k['median_agent_cpu_s']:.3f} |")
    for pair, r in s["ratios"].items():
        low, high = r["iqr_round"]
        ci_low, ci_high = r["geomean_ci95"]
        lines.append(f"{pair}: ratio of medians {r['of_medians']:.3f}; per round: median {r['median_round']:.3f}, "
                     f"p25-p75 {low:.3f}-{high:.3f}, geometric mean {r['geomean']:.3f} (95 % CI {ci_low:.3f}-"
                     f"{ci_high:.3f}); median when it ran first {_fmt(r['ran_first'])}, second {_fmt(r['ran_second'])}")
        lines.append("  rounds: " + " ".join(f"{x:.2f}" for x in r["rounds"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=int, default=3, help="length of one iperf3 run")
    parser.add_argument("--phases", default="running,stopped",
                        help="comma-separated, in order: running (agents as they run), stopped (agents SIGSTOPped)")
    parser.add_argument("--hand", default="hand",
                        help="hand-made interfaces, comma-separated, the first is the reference: hand, hand-shell")
    parser.add_argument("--mode", choices=("alternate", "concurrent"), default="alternate")
    parser.add_argument("--iperf-session", choices=("bench", "own"), default="bench")
    parser.add_argument("--uapi-poll-hz", type=float, default=0.0)
    parser.add_argument("--rate", help="iperf3 -b: a fixed rate below saturation (e.g. 100M), so that the "
                                       "wireguard-go CPU seconds per Gbit compare the per-packet cost")
    parser.add_argument("--json", type=Path, help="write every run, the interfaces' facts and the summary (JSON)")
    args = parser.parse_args()
    hands = args.hand.split(",")
    if not hands or any(h not in HAND_KINDS for h in hands) or len(set(hands)) != len(hands):
        parser.error(f"--hand takes distinct kinds out of {', '.join(HAND_KINDS)}")
    phases = args.phases.split(",")
    if any(p not in ("running", "stopped") for p in phases) or phases.count("stopped") > 1 or (
            "stopped" in phases and phases[-1] != "stopped"):
        parser.error("--phases: running and/or stopped, stopped last (agents are not resumed)")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, TUN devices)")
    # SIGTERM (a supervisor, `timeout`) must unwind through close() as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(args)
    results: dict[str, object] = {}
    poller: UapiPoller | None = None
    try:
        bench.up()
        facts = bench.describe()
        for kind, fact in facts.items():
            print(f"--- {kind} interface (n1)\n" + "\n".join(f"{k}: {v}" for k, v in fact.items()))
        if args.uapi_poll_hz > 0:
            poller = UapiPoller(bench.interfaces["agent"].names[0], args.uapi_poll_hz)
            poller.thread.start()
        tables = []
        for phase in phases:
            if phase == "stopped":
                bench.stop_agents()
            runs = bench.phase(phase)
            results[phase] = {"runs": [asdict(r) for r in runs], "summary": summary(runs, bench.kinds)}
            tables.append(table(f"agents {phase}", results[phase]["summary"], bench.kinds))  # type: ignore[index]
        if poller is not None:
            poller.stop.set()
            print(f"UAPI reads of the agent's interface during the runs: {poller.reads}")
        print("\n".join(tables))
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "facts": facts,
                                             "phases": results}, indent=1))
    finally:
        if poller is not None:
            poller.stop.set()
        bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
