"""Footprint of real `meshvpn-agent` processes in a settled lab: resident memory and idle CPU.

Builds a meshlab of N nodes (embedded broker + registrar, wireguard-go), waits for the full mesh, lets it
settle, then samples every agent's /proc/<pid>/status (VmRSS, VmHWM), /proc/<pid>/smaps_rollup (Pss) and
/proc/<pid>/stat (utime + stime) once a second for the measurement window. wireguard-go is a separate process
and is reported on its own row, as is the registrar (context: it serves every agent). Idle means no traffic
but the control plane's: heartbeats, the agent's reconcile loop and its WireGuard polling.

Run as root from the repository (the numbers in docs/benchmarks.md come from the defaults):

    .venv/bin/python bench/bench_agent.py [--nodes 4] [--duration 60] [--settle 10] [--heartbeats 1,5]

Before the window it also times each agent's start, from the kernel's start time of its process (10 ms ticks)
to its log lines (ms stamps): the first line (the interpreter and the imports are done), "agent starting"
(settings, backends and, on a first start, enrollment over HTTPS are done) and "registered as" (wireguard-go
started, broker connected, the registrar replied). Once as the lab joins them, and once more per agent after
`--restarts` graceful stop + start (already enrolled: no join token, no HTTPS).

One lab per heartbeat interval (the registrar hands the interval to agents when they register); TTL is
3 intervals, as in the lab defaults. Aims: under 50 MB RSS and under 0.2 % of one core per idle agent.

Start times follow the machine's load more than the code, so two versions are compared in one lab, alternating
(same registrar, same load), with each start's steps read from its log:

    .venv/bin/python bench/bench_agent.py --compare-starts /path/to/base/checkout --joins 6 --restarts 6

Each round joins one new node running the base checkout's code (PYTHONPATH) and one running this one's, then
restarts one node of each gracefully; no memory window.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_lab import parse_log  # bench/ is sys.path[0] when this runs as a script

from meshlab import system
from meshlab.lab import Lab, new_lab_id
from meshlab.settings import LabSettings
from meshlab.waiting import wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTUP_MARKS = ("first log line", "agent starting", "registered as")
# The steps of a start in its log, for --compare-starts: enrollment (a join only), wireguard-go (when it was not
# running), the broker's TLS connection, the registration request (after the registrar's reflection over HTTPS).
STEP_MARKS = ("first log line", "enrolled in mesh", "agent starting", "started wireguard-go",
              "connected to the broker", "registering", "registered as")
THIS_CHECKOUT = Path(__file__).resolve().parents[1]
CPU_WINDOW_S = 10.0  # CPU % is also reported per window of this length, so a periodic spike shows as max
AIM_RSS_MB = 50.0
AIM_CPU_PCT = 0.2


# --- pure: parsing /proc text and summarising samples -------------------------------------------------------


def parse_status_kb(text: str, key: str) -> int | None:
    """The value in kB of `key` (e.g. VmRSS) in /proc/<pid>/status or smaps_rollup text; None if absent."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def parse_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from /proc/<pid>/stat; the command name may contain spaces and parens."""
    fields = stat.rsplit(")", 1)[1].split()
    # After the name: field 3 (state) is fields[0], so utime (14) and stime (15) are fields[11] and fields[12].
    return int(fields[11]) + int(fields[12])


@dataclass
class Series:
    """Samples of one process: (monotonic time, cpu ticks, rss kB, pss kB)."""

    label: str
    kind: str
    samples: list[tuple[float, int, int, int | None]] = field(default_factory=list)
    hwm_kb: int = 0


def cpu_percent(samples: list[tuple[float, int, int, int | None]]) -> float:
    """Mean CPU % of one core between the first and the last sample."""
    (t0, c0, *_), (t1, c1, *_) = samples[0], samples[-1]
    return 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0)


def cpu_windows(samples: list[tuple[float, int, int, int | None]], window_s: float) -> list[float]:
    """CPU % in consecutive windows of about `window_s` seconds."""
    out, start = [], 0
    for i in range(1, len(samples)):
        if samples[i][0] - samples[start][0] >= window_s:
            out.append(cpu_percent(samples[start:i + 1]))
            start = i
    return out


def startup_marks(events: list[tuple[float, str]], started: float,
                  marks_wanted: tuple[str, ...] = STARTUP_MARKS) -> dict[str, float]:
    """Seconds from `started` to the first log line and to the first line starting with each other mark (default:
    "agent starting", "registered as") among (wall time, message) `events`; a mark never reached is absent."""
    marks: dict[str, float] = {}
    for t, msg in events:
        marks.setdefault("first log line", t - started)
        for mark in marks_wanted[1:]:
            if msg.startswith(mark):
                marks.setdefault(mark, t - started)
    return marks


# --- I/O: the processes of a lab ---------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def _comm(pid: int) -> str:
    return (_read(f"/proc/{pid}/comm") or "").strip()


def lab_processes(lab: Lab) -> list[tuple[str, str, int]]:
    """(label, kind, pid) for every agent, every wireguard-go and the registrar of the lab."""
    st = lab.state()
    out = []
    for node in st.ordered_nodes():
        assert node.agent is not None
        out.append((node.name, "agent", node.agent.pid))
        wg = [pid for pid in system.namespace_pids(node.namespace) if _comm(pid) == "wireguard-go"]
        out += [(node.name, "wireguard-go", pid) for pid in wg]
    assert st.control.registrar is not None
    out.append(("ctl", "registrar", st.control.registrar.pid))
    return out


def sample(series: dict[int, Series]) -> None:
    now = time.monotonic()
    for pid, s in series.items():
        status, stat = _read(f"/proc/{pid}/status"), _read(f"/proc/{pid}/stat")
        if status is None or stat is None:
            raise SystemExit(f"{s.kind} of {s.label} (pid {pid}) exited during the measurement")
        rollup = _read(f"/proc/{pid}/smaps_rollup")
        s.samples.append((now, parse_cpu_ticks(stat), parse_status_kb(status, "VmRSS") or 0,
                          parse_status_kb(rollup, "Pss") if rollup else None))
        s.hwm_kb = max(s.hwm_kb, parse_status_kb(status, "VmHWM") or 0)


def _start_wall(start_ticks: int) -> float:
    """Wall time of a process start given in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - start_ticks / CLK_TCK)


def agent_startup(lab: Lab, name: str, marks_wanted: tuple[str, ...] = STARTUP_MARKS) -> dict[str, float]:
    """startup_marks of the current process of `name`'s agent, from its log, and the CPU time it has used so far
    ("cpu": seconds; read right after the lab saw it join, so nearly all of it is the start itself). Wall times
    grow with the machine's load; the CPU time much less."""
    agent = lab.node(name).agent
    assert agent is not None
    started = _start_wall(agent.start_ticks)
    stat = _read(f"/proc/{agent.pid}/stat")
    text = lab.store.agent_log(name).read_text(errors="replace")
    events = [(e.t, e.msg) for e in parse_log(text, started) if e.t >= started - 0.01]
    marks = startup_marks(events, started, marks_wanted)
    if stat is not None:
        marks["cpu"] = parse_cpu_ticks(stat) / CLK_TCK
    return marks


def registered_startup(lab: Lab, name: str, marks_wanted: tuple[str, ...] = STARTUP_MARKS) -> dict[str, float]:
    """agent_startup of `name` once its log says it registered (the lab may see the join a moment earlier)."""
    found: dict[str, float] = {}

    def logged() -> bool:
        found.update(agent_startup(lab, name, marks_wanted))
        return "registered as" in found

    wait_for(logged, timeout=30, what=f"{name} logs its registration", interval=0.05)
    return found


def restarted(lab: Lab, name: str) -> dict[str, float]:
    """Stop `name`'s agent gracefully, start it again (enrolled already) and time that start."""
    lab.stop(name)
    lab.start(name, wait=True)
    return registered_startup(lab, name)


def measure(*, nodes: int, heartbeat: float, settle: float, duration: float, lab_dir: Path,
            restarts: int = 0) -> tuple[list[Series], dict[str, list[dict[str, float]]]]:
    settings = LabSettings(lab_dir=lab_dir, broker="embedded", heartbeat_interval_s=heartbeat,
                           heartbeat_ttl_s=3 * heartbeat, join_timeout_s=60)
    lab = Lab(settings)
    try:
        lab.up(nodes, lab_id=new_lab_id())
        lab.wait_mesh(timeout=60)
        names = [n.name for n in lab.state().ordered_nodes()]
        startups: dict[str, list[dict[str, float]]] = {"join": [registered_startup(lab, n) for n in names],
                                                         "restart": []}
        for _ in range(restarts):
            for name in names:
                startups["restart"].append(restarted(lab, name))
                lab.wait_mesh(timeout=60)
        # Settling is the point here, not a proof of anything: let start-up allocation and handshakes finish.
        time.sleep(settle)
        lab.wait_mesh(timeout=10)
        series = {pid: Series(label, kind) for label, kind, pid in lab_processes(lab)}
        end = time.monotonic() + duration
        while True:
            sample(series)
            if time.monotonic() >= end:
                break
            time.sleep(1.0)
        problems = lab.mesh_problems()
        if problems:
            raise SystemExit(f"the mesh was not complete at the end of the window: {problems}")
        return list(series.values()), startups
    finally:
        lab.down()


def compare_starts(*, base: Path, joins: int, restarts: int, lab_dir: Path) -> dict[str, list[dict[str, float]]]:
    """Starts of the agent in one lab, alternating between `base`'s code and this checkout's: per round one join
    of each, then (after the joins) one graceful restart of each; keyed "join base", "join this", ... The
    registrar and the lab's helpers run this checkout's code."""
    codes = {"base": str(base.resolve()), "this": str(THIS_CHECKOUT)}
    settings = LabSettings(lab_dir=lab_dir, broker="embedded", heartbeat_interval_s=5.0, heartbeat_ttl_s=15.0,
                           join_timeout_s=60)
    previous = os.environ.get("PYTHONPATH")
    results: dict[str, list[dict[str, float]]] = {f"{kind} {code}": [] for kind in ("join", "restart")
                                                  for code in codes}
    lab = Lab(settings)
    try:
        os.environ["PYTHONPATH"] = codes["this"]
        lab.up(0, lab_id=new_lab_id())
        names: dict[str, str] = {}
        for _ in range(joins):
            for code, path in codes.items():
                os.environ["PYTHONPATH"] = path  # the agent inherits the lab's environment (meshlab.context)
                name = lab.add().name
                names[code] = name
                results[f"join {code}"].append(registered_startup(lab, name, STEP_MARKS))
                lab.wait_mesh(timeout=60)
        for _ in range(restarts):
            for code, path in codes.items():
                os.environ["PYTHONPATH"] = path
                lab.stop(names[code])
                lab.start(names[code], wait=True)
                results[f"restart {code}"].append(registered_startup(lab, names[code], STEP_MARKS))
                lab.wait_mesh(timeout=60)
        return results
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous
        lab.down()


def step_times(run: dict[str, float]) -> dict[str, float]:
    """Seconds each step of one start took: from the previous mark it reached to this one (the first log line:
    from the process start), plus "after imports" (first log line -> registered as)."""
    steps: dict[str, float] = {}
    previous = 0.0
    for mark in STEP_MARKS:
        if mark in run:
            steps[mark] = run[mark] - previous
            previous = run[mark]
    if "registered as" in run and "first log line" in run:
        steps["after imports"] = run["registered as"] - run["first log line"]
    return steps


def report_steps(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """Per start and code: median (min) of each step's own time, of the time after the imports, of process
    start -> "registered as", and of the agent's CPU by then."""
    columns = (*(f"-> {m}" for m in STEP_MARKS), "after imports", "start -> registered", "CPU by then")
    lines = ["| start | code | n | " + " | ".join(columns) + " |", "| --- | --- | --- |" + " --- |" * len(columns)]
    for key, runs in results.items():
        kind, code = key.split()
        per_run = [{**{f"-> {m}": v for m, v in step_times(r).items() if m != "after imports"},
                    "after imports": step_times(r).get("after imports"),
                    "start -> registered": r.get("registered as"), "CPU by then": r.get("cpu")} for r in runs]
        cells = []
        for column in columns:
            values = [p[column] for p in per_run if p.get(column) is not None]
            cells.append(f"{statistics.median(values):.3f} ({min(values):.3f})" if values else "-")
        lines.append(f"| {kind} | {code} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def _mb(kb: float) -> float:
    return kb / 1024.0


def report(heartbeat: float, series: list[Series]) -> list[str]:
    lines = [f"heartbeat {heartbeat:g} s, {len(series[0].samples)} samples per process",
             "| process | RSS mean (MB) | RSS max (MB) | VmHWM (MB) | PSS mean (MB) | CPU mean (% core) "
             f"| CPU max per {CPU_WINDOW_S:g} s (% core) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in series:
        rss = [r for _, _, r, _ in s.samples]
        pss = [p for *_, p in s.samples if p is not None]
        windows = cpu_windows(s.samples, CPU_WINDOW_S) or [cpu_percent(s.samples)]
        lines.append(f"| {s.kind} {s.label} | {_mb(statistics.mean(rss)):.1f} | {_mb(max(rss)):.1f} "
                     f"| {_mb(s.hwm_kb):.1f} | {_mb(statistics.mean(pss)) if pss else float('nan'):.1f} "
                     f"| {cpu_percent(s.samples):.3f} | {max(windows):.3f} |")
    agents = [s for s in series if s.kind == "agent"]
    worst_rss = max(_mb(max(r for _, _, r, _ in s.samples)) for s in agents)
    worst_cpu = max(cpu_percent(s.samples) for s in agents)
    verdict = ("meets" if worst_rss < AIM_RSS_MB and worst_cpu < AIM_CPU_PCT else "MISSES")
    lines.append(f"agents: worst RSS {worst_rss:.1f} MB (aim < {AIM_RSS_MB:g}), worst mean CPU {worst_cpu:.3f} % "
                 f"(aim < {AIM_CPU_PCT:g}) -> {verdict} the aims")
    return lines


def report_startups(startups: dict[str, list[dict[str, float]]]) -> list[str]:
    lines = ["| agent start | starts | " + " | ".join(f"start -> {m}: median (max) s" for m in STARTUP_MARKS)
             + " | agent CPU by then: median (max) s |",
             "| --- | --- |" + " --- |" * (len(STARTUP_MARKS) + 1)]
    for kind, runs in startups.items():
        if not runs:
            continue
        cells = []
        for mark in (*STARTUP_MARKS, "cpu"):
            values = [r[mark] for r in runs if mark in r]
            cells.append(f"{statistics.median(values):.3f} ({max(values):.3f})" if values else "-")
        lines.append(f"| {kind} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0, help="measurement window per heartbeat (s)")
    parser.add_argument("--settle", type=float, default=10.0, help="wait after the full mesh before sampling (s)")
    parser.add_argument("--heartbeats", default="1,5", help="comma-separated heartbeat intervals (s)")
    parser.add_argument("--restarts", type=int, default=1,
                        help="graceful stop + start of every agent this many times before the window, timed")
    parser.add_argument("--lab-dir", type=Path)
    parser.add_argument("--compare-starts", type=Path, metavar="CHECKOUT",
                        help="only time starts, alternating with the code of this other checkout in one lab")
    parser.add_argument("--joins", type=int, default=6, help="with --compare-starts: joins per code")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_agent needs root (network namespaces, wireguard-go)")
        return 2
    if args.compare_starts is not None:
        lab_dir = args.lab_dir or Path(tempfile.mkdtemp(prefix="meshlab-starts."))
        print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        results = compare_starts(base=args.compare_starts, joins=args.joins, restarts=args.restarts,
                                 lab_dir=lab_dir)
        print("\n".join(report_steps(results)))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return 0
    for heartbeat in (float(h) for h in args.heartbeats.split(",")):
        lab_dir = args.lab_dir or Path(tempfile.mkdtemp(prefix="meshlab-footprint."))
        series, startups = measure(nodes=args.nodes, heartbeat=heartbeat, settle=args.settle,
                                   duration=args.duration, lab_dir=lab_dir, restarts=args.restarts)
        print("\n".join(report_startups(startups)))
        print("\n".join(report(heartbeat, series)), flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
