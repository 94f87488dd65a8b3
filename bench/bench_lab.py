"""Convergence times of a real lab (wireguard-go in namespaces, heartbeat 1 s, TTL 3 s), on either broker.

Each run adds a fresh node to a lab of N-1 running nodes (so N run) and then measures, with p50/p95 over runs:

  start->reachable      agent process start (kernel start time of its pid) -> every pair of the new node and
                        each other node has answered an ICMP echo through the tunnel, in both directions
  registered->reachable the registrar's "member joined" log line -> the same moment: the control plane's share
  registered->tunnels   the registrar's "member joined" -> the last other node logged "peer added" for it
  sigkill->vouched      agent SIGKILLed (wireguard-go keeps running, so it still answers over the mesh) -> the
                        registrar logs it control_lost (a peer vouched); no tunnel to it may be removed meanwhile
  freeze->removed       whole node SIGSTOPped -> no other node holds a tunnel to it (heartbeat TTL only)
  partition->removed    node's underlay link down -> no other node holds a tunnel to it (heartbeat TTL only)
  heal->complete        underlay link up again -> the mesh of all N is complete
  crash->removed        every process of the node SIGKILLed (its tunnel vanishes) -> no other node holds it
  restart->complete     node crashed (every process SIGKILLed), agent started again -> the mesh is complete
  leave->removed        agent SIGTERMed (graceful) -> no other node holds a tunnel to it
  outage->reconnected   broker restarted after a 3 s outage -> every agent is connected and sees the registrar
  outage: tunnels torn down   "peer removed" lines among the steady nodes from the outage to one TTL after it

and counts ICMP loss between two nodes that stay up (during the run's reconfigurations, and from the broker
outage until one TTL after every agent reconnected; with the embedded broker that outage stops the registrar too).

How the clocks are read, all on this one host (CLOCK_REALTIME; the lab's namespaces share it):
- "removed" is the latest "peer removed" line for the node in the other agents' logs (millisecond stamps,
  written right after wireguard-go applied the change); `wg show` is also polled every 50 ms as a cross-check
  and gives the end of the wait. Faults are stamped just before the signal or link change.
- "reachable" uses one `ping -D -i 0.05` per direction and pair (iputils stamps each reply), started once the
  new node's agent logs "registered as": resolution 50 ms, plus the WireGuard handshake the first packet
  triggers. A direction whose ping exits (no route yet) is restarted after 20 ms.
- "complete" polls `wg show` in every namespace (one round takes ~N x 15 ms here, on top of the 50 ms sleep).
- Each fault is injected QUIET_S (0.5 s) after the previous step completed. The registrar publishes a change
  at once only after a quiet publish window (0.2 s; changes closer together are debounced into one roster), and
  "complete" is reached within milliseconds of the previous publish: without the pause a fault would measure the
  tail of the previous step's debounce, not the event itself.

Run as root from the repository:
  .venv/bin/python bench/bench_lab.py --nodes 4 --runs 10 --broker both
  .venv/bin/python bench/bench_lab.py --nodes 8 --runs 5 --broker both --timeline docs/img/convergence.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshlab import system
from meshlab.context import child_env
from meshlab.lab import Lab, new_lab_id
from meshlab.meshview import holders_of
from meshlab.plan import next_index
from meshlab.settings import LabSettings
from meshlab.waiting import wait_for

POLL = 0.05
PING_INTERVAL = 0.05
OUTAGE_S = 3.0
QUIET_S = 0.5
MEASURES = ("start->reachable", "registered->reachable", "registered->tunnels", "sigkill->vouched",
            "freeze->removed", "partition->removed", "heal->complete", "crash->removed", "restart->complete",
            "leave->removed", "outage (actual)", "outage->reconnected", "outage: tunnels torn down")
AIMS = {  # issue #4: the aim each measure is judged against (seconds), None where there is none
    "registered->reachable": 0.25, "sigkill->vouched": 1.5, "freeze->removed": 3.5, "partition->removed": 3.5,
    "leave->removed": 0.1,
}

# `HH:MM:SS.mmm LEVEL logger: message [k=v ...]` (meshcontract.logs.TextFormatter)
_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) +\w+ +([\w.]+): (.*?)(?: \[(.*)\])?$")
_CTX = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One log line of interest: wall time, the message and its context fields."""

    t: float
    logger: str
    msg: str
    ctx: dict[str, str]


def _wall_of(hms: tuple[int, int, int, int], ref: float) -> float:
    """A local HH:MM:SS.mmm stamp as epoch seconds, on whichever day puts it nearest to `ref`."""
    h, m, s, ms = hms
    day = time.localtime(ref)
    base = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, h, m, s, 0, 0, -1)) + ms / 1000
    return min((base + d * 86400 for d in (-1, 0, 1)), key=lambda t: abs(t - ref))


def parse_log(text: str, ref: float) -> list[LogEvent]:
    """The service log lines of `text` (continuation lines of tracebacks are skipped)."""
    out = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        hms = tuple(int(g) for g in match.groups()[:4])
        ctx = dict(_CTX.findall(match.group(7) or ""))
        out.append(LogEvent(_wall_of(hms, ref), match.group(5), match.group(6), ctx))  # type: ignore[arg-type]
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with 5 values p95 is the largest)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _process_start_wall(pid_ticks: int) -> float:
    """Wall time at which a process with start time `pid_ticks` (clock ticks since boot) started (+-10 ms)."""
    hz = os.sysconf("SC_CLK_TCK")
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - pid_ticks / hz)


class Logs:
    """The lab's agent and registrar logs, parsed on demand."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def agent(self, name: str, *, since: float) -> list[LogEvent]:
        return [e for e in parse_log(_read(self.lab.store.agent_log(name)), since) if e.t >= since - 0.002]

    def registrar(self, *, since: float) -> list[LogEvent]:
        path = self.lab.store.control_dir / "registrar.log"
        return [e for e in parse_log(_read(path), since) if e.t >= since - 0.002]

    def last_peer_event(self, others: Sequence[str], victim: str, kind: str, *, since: float,
                        timeout: float = 3.0) -> float | None:
        """Latest first "peer <kind>" line about `victim` over `others` after `since`; None if one never logs it."""
        deadline = time.monotonic() + timeout
        while True:
            firsts = []
            for other in others:
                hits = [e.t for e in self.agent(other, since=since)
                        if e.msg == f"peer {kind}" and e.ctx.get("node_name") == victim]
                if hits:
                    firsts.append(min(hits))
            if len(firsts) == len(others):
                return max(firsts)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)


class PairPings:
    """One continuous `ping -D` per direction between `victim` and each of `others`; first reply per direction."""

    def __init__(self, lab: Lab, victim: str, victim_ns: str, victim_ip: str, others: Sequence[str],
                 log_dir: Path) -> None:
        self.lab = lab
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        st = lab.state()
        self.pairs: dict[tuple[str, str], tuple[str, str]] = {}  # (src, dst) -> (src namespace, dst ip)
        for other in others:
            rec = st.node(other)
            assert rec.mesh_ip is not None
            self.pairs[(other, victim)] = (rec.namespace, victim_ip)
            self.pairs[(victim, other)] = (victim_ns, rec.mesh_ip)
        self.procs: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
        self.first: dict[tuple[str, str], float] = {}
        self._starts = 0

    def _start(self, pair: tuple[str, str]) -> None:
        ns, ip = self.pairs[pair]
        self._starts += 1
        with open(self.log_dir / f"{pair[0]}-{pair[1]}-{self._starts}.log", "wb") as out:
            self.procs[pair] = subprocess.Popen(
                system.ns_argv(ns, ["ping", "-D", "-n", "-i", str(PING_INTERVAL), ip]),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env())
        self.procs[pair].log_path = out.name  # type: ignore[attr-defined]

    def poll(self) -> bool:
        """Read replies so far, restart pings that exited without one; True once every direction answered."""
        for pair in self.pairs:
            if pair in self.first:
                continue
            proc = self.procs.get(pair)
            if proc is None:
                self._start(pair)
                continue
            stamps = re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", _read(Path(proc.log_path)), re.M)  # type: ignore[attr-defined]
            if stamps:
                self.first[pair] = float(stamps[0])
                self._stop(proc)
            elif proc.poll() is not None:
                self._start(pair)
        return len(self.first) == len(self.pairs)

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.procs.values():
            self._stop(proc)


@dataclass(slots=True)
class RunResult:
    values: dict[str, float] = field(default_factory=dict)
    polled: dict[str, float] = field(default_factory=dict)  # the wg-show polled removal times, for comparison
    decided: dict[str, float] = field(default_factory=dict)  # fault -> the registrar's "member unreachable"
    loss: dict[str, tuple[int, int]] = field(default_factory=dict)  # phase -> (sent, received)
    marks: list[tuple[float, str, str]] = field(default_factory=list)  # (wall time, node, what) from the bench
    plot_end: float = 0.0  # the timeline plot stops after the leave (the outage would squeeze the rest)


class Bench:
    """Drives one lab through the runs."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.logs = Logs(lab)

    def _removed(self, ip: str, others: list[str]) -> float:
        return wait_for(lambda: not holders_of(self.lab.views(others), ip, among=others), timeout=60,
                        what="removed", interval=POLL)

    def _complete(self, names: list[str]) -> float:
        return wait_for(lambda: not self.lab.mesh_problems(names), timeout=90, what="complete", interval=POLL)

    def _fault_removed(self, res: RunResult, key: str, victim: str, ip: str, others: list[str],
                       t_fault: float) -> float:
        """Wait until no other node holds `victim`; record the log-based time (polled if a log line is missing)."""
        self._removed(ip, others)
        t_end = time.time()  # the fault call itself may block (SIGTERM waits for the exit): clock from t_fault
        res.polled[key] = t_end - t_fault
        t_log = self.logs.last_peer_event(others, victim, "removed", since=t_fault)
        # The log line follows the change in wireguard-go, so both are upper bounds: take the tighter one.
        t_removed = min(t_end, t_log) if t_log is not None else t_end
        res.values[key] = t_removed - t_fault
        # When the registrar decided (its "member unreachable" line): the rest is its publish debounce + delivery.
        decided = [e.t for e in self.logs.registrar(since=t_fault)
                   if e.msg.startswith("member unreachable") and e.ctx.get("node_name") == victim]
        if decided:
            res.decided[key] = decided[0] - t_fault
        res.marks.append((t_removed, "*", "removed everywhere"))
        return t_removed

    def _vouched(self, res: RunResult, key: str, victim: str, ip: str, others: list[str], t_fault: float) -> None:
        """Wait for the registrar's "control plane lost, tunnels alive" line about `victim`; every other node must
        hold its tunnel all along (its WireGuard still answers: liveness on both planes, docs/design.md)."""

        def vouched() -> float | None:
            lines = [e.t for e in self.logs.registrar(since=t_fault)
                     if e.msg.startswith("member control plane lost") and e.ctx.get("node_name") == victim]
            assert sorted(holders_of(self.lab.views(others), ip, among=others)) == sorted(others), (
                f"a tunnel to {victim} was removed although it answers over the mesh")
            return lines[0] if lines else None

        res.values[key] = wait_for(vouched, timeout=30, what=f"{victim} vouched for", interval=POLL) - t_fault
        res.marks.append((t_fault + res.values[key], "registrar", "control_lost (vouched)"))

    def _quiet(self) -> None:
        time.sleep(QUIET_S)  # separates one measured event from the previous one (see the module docstring)

    def _mark(self, res: RunResult, node: str, what: str) -> float:
        now = time.time()
        res.marks.append((now, node, what))
        return now

    def _wait_connected(self, names: list[str]) -> float:
        def ok() -> bool:
            for name in names:
                status = self.lab.agent_status(name, timeout=1.0)
                if status is None or not (status.broker_connected and status.registrar_online):
                    return False
            return True
        return wait_for(ok, timeout=90, what="agents reconnected", interval=POLL)

    def one_run(self, run_dir: Path) -> RunResult:
        lab = self.lab
        res = RunResult()
        base = lab.running_nodes()
        st = lab.state()
        index = next_index(st.used_indices)
        plan_node = lab.plan(st).node(index)
        victim = plan_node.name
        steady = lab.start_pinger(base[0], base[1], interval_s=0.1)

        # --- join: start lab.add() aside, begin pinging as soon as the agent says it is registered
        t_call = self._mark(res, victim, "meshlab add")
        errors: list[BaseException] = []

        def add() -> None:
            try:
                lab.add()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread and re-raised there
                errors.append(exc)

        adder = threading.Thread(target=add, daemon=True)
        adder.start()
        victim_ip = ""

        def registered() -> bool:
            nonlocal victim_ip
            if errors:
                raise errors[0]
            for e in self.logs.agent(victim, since=t_call):
                if e.msg.startswith("registered as "):
                    victim_ip = e.msg.split()[2].split("/")[0]
                    return True
            return False

        wait_for(registered, timeout=60, what="registered", interval=0.02)
        pings = PairPings(lab, victim, plan_node.namespace, victim_ip, base, run_dir / "join")
        try:
            wait_for(pings.poll, timeout=60, what="reachable", interval=POLL)
        finally:
            pings.close()
        adder.join(timeout=60)
        if errors:
            raise errors[0]
        record = lab.node(victim)
        assert record.agent is not None
        t_spawn = _process_start_wall(record.agent.start_ticks)
        t_reach = max(pings.first.values())
        joined = [e.t for e in self.logs.registrar(since=t_call)
                  if e.msg.startswith("member joined") and e.ctx.get("node_name") == victim]
        t_joined = joined[0] if joined else float("nan")
        t_tunnels = self.logs.last_peer_event(base, victim, "added", since=t_call)
        res.values["start->reachable"] = t_reach - t_spawn
        res.values["registered->reachable"] = t_reach - t_joined
        res.values["registered->tunnels"] = (t_tunnels - t_joined) if t_tunnels else float("nan")
        res.marks += [(t_spawn, victim, "agent process started"), (t_joined, "registrar", "registrar: joined"),
                      (t_reach, "*", "reachable from all")]
        ip = victim_ip
        others = base

        # --- SIGKILL of the agent alone
        self._quiet()
        t = self._mark(res, victim, "SIGKILL agent")
        lab.kill(victim)
        self._vouched(res, "sigkill->vouched", victim, ip, others, t)
        self._mark(res, victim, "agent started again")
        lab.start(victim, wait=False)
        self._complete([*others, victim])
        self._mark(res, "*", "complete")

        # --- freeze the whole node
        self._quiet()
        t = self._mark(res, victim, "SIGSTOP node")
        lab.freeze(victim)
        self._fault_removed(res, "freeze->removed", victim, ip, others, t)
        self._mark(res, victim, "SIGCONT node")
        lab.thaw(victim)
        self._complete([*others, victim])
        self._mark(res, "*", "complete")

        # --- partition: the underlay link goes down
        self._quiet()
        t = self._mark(res, victim, "link down")
        lab.partition(victim)
        self._fault_removed(res, "partition->removed", victim, ip, others, t)
        t = self._mark(res, victim, "link up")
        lab.heal(victim)
        self._complete([*others, victim])
        res.values["heal->complete"] = time.time() - t
        self._mark(res, "*", "complete")

        # --- machine crash and restart
        self._quiet()
        t = self._mark(res, victim, "crash (SIGKILL all)")
        lab.crash(victim)
        self._fault_removed(res, "crash->removed", victim, ip, others, t)
        t = self._mark(res, victim, "restarted")
        lab.start(victim, wait=False)
        self._complete([*others, victim])
        res.values["restart->complete"] = time.time() - t
        self._mark(res, "*", "complete")

        # --- graceful leave
        self._quiet()
        t = self._mark(res, victim, "SIGTERM (leave)")
        lab.stop(victim)
        self._fault_removed(res, "leave->removed", victim, ip, others, t)
        res.loss["reconfiguration"] = steady.stop()
        res.plot_end = time.time()

        # --- control-plane outage: the broker (with the embedded one, the registrar too) is down for OUTAGE_S
        steady = lab.start_pinger(base[0], base[1], interval_s=0.1)
        t_stop = self._mark(res, "broker", "broker stop")
        lab.broker("stop")
        time.sleep(OUTAGE_S)  # the outage itself, not a wait for a condition
        t = time.time()
        res.values["outage (actual)"] = t - t_stop  # stopping may take longer than asked (a slow shutdown)
        lab.broker("start")
        t = self._mark(res, "broker", "broker started")
        self._wait_connected(others)
        res.values["outage->reconnected"] = time.time() - t
        self._mark(res, "*", "all reconnected")
        # Whatever the reconnection sets off (republished records, re-registrations) happens in the next
        # seconds: keep counting loss for one TTL, then require the complete mesh before the next run.
        time.sleep(lab.settings.heartbeat_ttl_s)  # an observation window, not a wait for a condition
        self._complete(others)
        res.loss["broker outage"] = steady.stop()
        res.values["outage: tunnels torn down"] = float(sum(
            1 for o in others for e in self.logs.agent(o, since=t_stop) if e.msg == "peer removed"))
        return res

    def timeline(self, res: RunResult, t0: float, t1: float) -> dict:
        """Every node's agent events and the registrar's membership events in [t0, t1], for plot_timeline.py."""
        events = []
        names = [n.name for n in self.lab.state().ordered_nodes()]
        for name in names:
            for e in self.logs.agent(name, since=t0):
                if e.t > t1:
                    continue
                kind = {"agent starting": "start", "peer added": "added", "peer removed": "removed",
                        "peer updated": "updated"}.get(e.msg.split(":")[0])
                if e.msg.startswith("registered as"):
                    kind = "registered"
                if kind:
                    events.append({"t": e.t - t0, "node": name, "kind": kind, "peer": e.ctx.get("node_name", "")})
        for e in self.logs.registrar(since=t0):
            if e.t <= t1 and e.msg.startswith("member "):
                events.append({"t": e.t - t0, "node": "registrar", "kind": "reg-" + e.msg.split(" (")[0].split()[1],
                               "peer": e.ctx.get("node_name", "")})
        marks = [{"t": t - t0, "node": node, "what": what} for t, node, what in res.marks if t0 <= t <= t1]
        return {"nodes": [*names, "registrar"], "events": events, "marks": marks}


def run_broker(broker: str, args: argparse.Namespace) -> tuple[list[RunResult], dict | None]:
    lab_dir = Path(tempfile.mkdtemp(prefix=f"mlb-{broker[:4]}."))
    settings = LabSettings(lab_dir=lab_dir, broker=broker, heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)
    lab = Lab(settings)
    bench = Bench(lab)
    results: list[RunResult] = []
    timeline = None
    try:
        lab.up(args.nodes - 1, lab_id=new_lab_id())
        lab.wait_mesh(timeout=90)
        for run in range(args.runs):
            t0 = time.time()
            res = bench.one_run(lab_dir / "runs" / str(run))
            results.append(res)
            if run == 0:
                timeline = bench.timeline(res, t0, res.plot_end)
                timeline.update(broker=broker, n=args.nodes, t0=t0, victim=res.marks[0][1])
            print(f"{broker} N={args.nodes} run {run + 1}/{args.runs}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in res.values.items())
                  + " | polled " + ", ".join(f"{k} {v:.3f}" for k, v in res.polled.items())
                  + " | loss " + ", ".join(f"{k} {s - r}/{s}" for k, (s, r) in res.loss.items()), flush=True)
    finally:
        lab.down()
    print(f"(logs kept in {lab_dir})")
    return results, timeline


def table(broker: str, n: int, results: list[RunResult]) -> str:
    lines = [f"\n{broker}, N={n}, heartbeat 1 s, TTL 3 s, {len(results)} runs\n",
             "| measure | p50 (s) | p95 (s) | min | max | registrar decided, p50 (s) | aim (p50) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in MEASURES:
        values = [r.values[key] for r in results if key in r.values and r.values[key] == r.values[key]]
        if not values:
            continue
        aim = AIMS.get(key)
        verdict = "" if aim is None else (f"< {aim:g} s: " + ("met" if statistics.median(values) < aim else "not met"))
        decided = [r.decided[key] for r in results if key in r.decided]
        decided_s = f"{statistics.median(decided):.3f}" if decided else ""
        lines.append(f"| {key} | {statistics.median(values):.3f} | {_percentile(values, 0.95):.3f} | "
                     f"{min(values):.3f} | {max(values):.3f} | {decided_s} | {verdict} |")
    for phase in ("reconfiguration", "broker outage"):
        sent = sum(r.loss[phase][0] for r in results if phase in r.loss)
        got = sum(r.loss[phase][1] for r in results if phase in r.loss)
        lines.append(f"| ICMP loss, {phase} (steady pair, every 0.1 s) | {sent - got} of {sent} | | | | | 0 |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=4, help="running nodes during each run (lab of N-1 + 1)")
    parser.add_argument("--broker", choices=("embedded", "mosquitto", "both"), default="embedded")
    parser.add_argument("--timeline", type=Path, help="write the first run's events (JSON) for plot_timeline.py")
    parser.add_argument("--json", type=Path, help="write every run's values (JSON)")
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    brokers = ("embedded", "mosquitto") if args.broker == "both" else (args.broker,)
    tables = []
    dump = {}
    for broker in brokers:
        results, timeline = run_broker(broker, args)
        tables.append(table(broker, args.nodes, results))
        dump[broker] = [{"values": r.values, "polled": r.polled, "decided": r.decided, "loss": r.loss}
                        for r in results]
        if args.timeline and timeline is not None and broker == brokers[0]:
            args.timeline.write_text(json.dumps(timeline, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"nodes": args.nodes, "runs": dump}, indent=1))
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
