"""NAT in a real lab: start -> reachable per kind of pair, roaming -> traffic again, sleep-and-return -> reachable.

Each run builds a fresh lab of N nodes (wireguard-go in namespaces, heartbeat 1 s, TTL 3 s), half of them behind
NAT routers (nftables masquerade, meshlab.topology): with N=8, n1-n4 public, n5 and n6 each behind a router of
their own, n7 and n8 behind one shared router (NAT group "home"). Then, in order:

  start     `lab.up` runs in a thread; every agent's local API is polled for its mesh IP. As soon as both ends
            of an ordered pair are registered, one `ping -D -i 0.1` runs from one to the other's mesh IP until
            its first reply. Per pair: later registration of the two -> first reply ("registered -> reachable"),
            grouped by kind: public<->public, public<->NAT, NAT<->NAT (different routers), same NAT. Per run:
            `lab.up` returned (every node has its mesh IP) -> every ordered pair has answered.
  sleep     the last node behind NAT (n8) is frozen (SIGSTOP to every process of its namespace: agent,
            wireguard-go, probe: a suspended laptop) until every peer removed its tunnel and at least --sleep-s
            passed, then thawed. Thaw -> first reply per direction between it and every peer (pings started at
            the thaw), and thaw -> every direction answered.
  roam NAT  the first node behind a NAT of its own (n5) moves behind a new NAT router (`lab.roam`: new private
            address, new public address) while pings run both ways between it and a public node (n1), a node
            behind another NAT of its own (n6) and one behind the shared NAT (n7). Per direction: roam done ->
            first reply after it. Also counted: how many of those peers dropped the roamer's tunnel meanwhile
            (their agents' peer_removed counters), i.e. whether the registrar judged it unreachable first.
  roam pub  the second public node (n2) moves to a new LAN address, with pings both ways to n1 and to n6 (own
            NAT). Same measures.

"roam done" is when `lab.roam` returned: the new link and route are in place (building a new router takes the
lab a while; that time is reported apart as "roam call"). Every reply ping stamps (-D) is on CLOCK_REALTIME,
which the namespaces share with this process. "Registered" is when an agent's local API first answered with a
mesh IP and `ready` (looked at in a loop; registered -> reachable is short by up to one look, and the bench
reports the longest gap between two looks). A direction
that does not answer within its deadline counts as a failure and is listed, not dropped.

Run as root from the repository (each run takes about 2 minutes on a 2-core machine):
  .venv/bin/python bench/bench_nat.py --runs 3 --json /tmp/nat.json
  .venv/bin/python bench/bench_nat.py --runs 3 --broker mosquitto --json /tmp/nat-mosq.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from meshlab import system
from meshlab.context import child_env
from meshlab.errors import LabStateError
from meshlab.lab import Lab, new_lab_id
from meshlab.meshview import holders_of
from meshlab.settings import LabSettings
from meshlab.waiting import wait_for

PING_INTERVAL_S = 0.1
POLL_S = 0.05
START_DEADLINE_S = 90.0  # after lab.up returned: every ordered pair answers
ROAM_DEADLINE_S = 90.0  # after the roam: every watched direction answers again
SLEEP_DEADLINE_S = 60.0  # after the thaw: every direction answers again
GROUP = "home"

PUBLIC, NAT = "public", "NAT"
KINDS = ("public<->public", "public<->NAT", "NAT<->NAT", "same NAT")

Pair = tuple[str, str]


# --- pure: topology, pair kinds, ping output, summaries ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Topology:
    """Where the N nodes sit: public ones, ones behind a NAT of their own, ones behind one shared NAT."""

    public: tuple[str, ...]
    own_nat: tuple[str, ...]
    shared_nat: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return sorted([*self.public, *self.own_nat, *self.shared_nat], key=lambda n: int(n[1:]))

    @property
    def sleeper(self) -> str:
        """The node that sleeps: the last one behind NAT (with N >= 6 not one the roams watch)."""
        return [*self.own_nat, *self.shared_nat][-1]

    def roam_peers(self) -> tuple[list[str], list[str]]:
        """(peers watched while the first own-NAT node roams, while the second public node roams): a public
        node, another node behind a NAT of its own and one behind the shared NAT where there are such."""
        nat = [self.public[0], *self.own_nat[1:2], *self.shared_nat[:1]]
        public = [self.public[0], self.own_nat[-1]]
        return nat, public

    def router_of(self) -> dict[str, str | None]:
        """Node -> a name for the NAT it sits behind (None: public); equal names share one router."""
        out: dict[str, str | None] = dict.fromkeys(self.public)
        out.update({name: f"own-{name}" for name in self.own_nat})
        out.update(dict.fromkeys(self.shared_nat, GROUP))
        return out


def topology(nodes: int) -> Topology:
    """Half of n1..n`nodes` behind NAT (the upper half): the last two behind one shared NAT when at least three
    are NATed (so that every kind of pair exists), each other one behind a NAT of its own."""
    if nodes < 4:
        raise ValueError("the NAT bench needs at least 4 nodes (two public, two behind NAT)")
    names = [f"n{i}" for i in range(1, nodes + 1)]
    natted = names[nodes - nodes // 2:]
    shared = natted[-2:] if len(natted) >= 3 else []
    return Topology(public=tuple(names[:nodes - nodes // 2]),
                    own_nat=tuple(n for n in natted if n not in shared), shared_nat=tuple(shared))


def pair_kind(a: str, b: str, router_of: Mapping[str, str | None]) -> str:
    """One of KINDS for the pair (a, b), whichever direction."""
    ra, rb = router_of[a], router_of[b]
    if ra is None and rb is None:
        return "public<->public"
    if ra is None or rb is None:
        return "public<->NAT"
    return "same NAT" if ra == rb else "NAT<->NAT"


_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ", re.M)


def first_reply(text: str, *, after: float = 0.0) -> float | None:
    """The stamp of the first reply in `ping -D` output at or after `after` (unix seconds); None if none yet."""
    for match in _REPLY.finditer(text):
        stamp = float(match.group(1))
        if stamp >= after:
            return stamp
    return None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (with fewer than 20 values p95 is the largest)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[max(1, math.ceil(len(ordered) * q)) - 1]


@dataclass(frozen=True, slots=True)
class Summary:
    """p50 / p95 / max over the values that answered, and how many never did."""

    count: int
    p50: float | None
    p95: float | None
    max: float | None
    failed: int

    def cells(self) -> str:
        if self.p50 is None:
            return f"- / - / - (0 of {self.count + self.failed})"
        failed = f", {self.failed} never" if self.failed else ""
        return f"{self.p50:.2f} / {self.p95:.2f} / {self.max:.2f} ({self.count}{failed})"


def summarize(values: Sequence[float | None]) -> Summary:
    """Summary of measurements where None means "no answer within the deadline"."""
    got = [v for v in values if v is not None]
    if not got:
        return Summary(0, None, None, None, len(values))
    return Summary(len(got), percentile(got, 0.5), percentile(got, 0.95), max(got), len(values) - len(got))


def by_kind(times: Mapping[Pair, float | None], router_of: Mapping[str, str | None]) -> dict[str, list[float | None]]:
    """The per-pair times grouped by pair kind, in KINDS order (kinds without pairs left out)."""
    out: dict[str, list[float | None]] = {kind: [] for kind in KINDS}
    for (a, b), t in sorted(times.items()):
        out[pair_kind(a, b, router_of)].append(t)
    return {kind: values for kind, values in out.items() if values}


def since(stamps: Mapping[Pair, float | None], start: float | Mapping[Pair, float]) -> dict[Pair, float | None]:
    """Each pair's stamp minus its start (one for all, or one per pair); None stays None."""
    return {pair: None if t is None else t - (start if isinstance(start, float) else start[pair])
            for pair, t in stamps.items()}


# --- I/O: pings in the lab ----------------------------------------------------------------------------------------


class Pings:
    """One `ping -D` per direction between lab nodes, its output in a file, read back for stamped replies."""

    def __init__(self, lab: Lab, log_dir: Path) -> None:
        self.lab = lab
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[Pair, subprocess.Popen[bytes]] = {}
        self.logs: dict[Pair, list[Path]] = {}
        self.targets: dict[Pair, tuple[str, str]] = {}  # pair -> (src namespace, dst mesh IP)

    def start(self, src: str, dst: str, *, namespace: str | None = None, ip: str | None = None) -> None:
        """Ping `dst` from `src` (namespace and mesh IP from the state file unless given)."""
        pair = (src, dst)
        self.targets[pair] = (namespace or self.lab.node(src).namespace, ip or self.lab.mesh_ip(dst))
        self._spawn(pair)

    def _spawn(self, pair: Pair) -> None:
        ns, ip = self.targets[pair]
        log = self.log_dir / f"{pair[0]}-{pair[1]}-{len(self.logs.get(pair, [])) + 1}.log"
        self.logs.setdefault(pair, []).append(log)
        with log.open("wb") as out:
            self.procs[pair] = subprocess.Popen(
                system.ns_argv(ns, ["ping", "-D", "-n", "-i", str(PING_INTERVAL_S), ip]),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env())

    def first_reply(self, pair: Pair, *, after: float = 0.0) -> float | None:
        """The first reply stamped at or after `after`; restarts a ping that exited (no route yet)."""
        for log in self.logs[pair]:
            stamp = first_reply(_read(log), after=after)
            if stamp is not None:
                return stamp
        proc = self.procs.get(pair)
        if proc is not None and proc.poll() is not None:
            self._spawn(pair)
        return None

    def stop(self, pair: Pair) -> None:
        proc = self.procs.pop(pair, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for pair in list(self.procs):
            self.stop(pair)

    def wait_all(self, pairs: Sequence[Pair], *, after: float, deadline_s: float,
                 stop: bool = True) -> dict[Pair, float | None]:
        """Wait until every pair has a reply stamped at or after `after` (or `deadline_s` passed); their stamps.
        With `stop`, each pair's ping is stopped once it answered."""
        found: dict[Pair, float | None] = dict.fromkeys(pairs)
        end = time.monotonic() + deadline_s
        while any(v is None for v in found.values()) and time.monotonic() < end:
            for pair in pairs:
                if found[pair] is None:
                    found[pair] = self.first_reply(pair, after=after)
                    if found[pair] is not None and stop:
                        self.stop(pair)
            time.sleep(POLL_S)
        return found


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --- one run ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RunResult:
    """What one run measured; per-pair values in seconds, None for "no answer within the deadline"."""

    reach: dict[Pair, float | None] = field(default_factory=dict)  # both registered -> first reply
    values: dict[str, float] = field(default_factory=dict)  # per-run single values
    sleep: dict[Pair, float | None] = field(default_factory=dict)  # thaw -> first reply
    roam_nat: dict[Pair, float | None] = field(default_factory=dict)  # roam done -> first reply
    roam_public: dict[Pair, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        def pairs(d: Mapping[Pair, float | None]) -> dict[str, float | None]:
            return {f"{a}->{b}": None if v is None else round(v, 3) for (a, b), v in d.items()}

        return {"values": {k: round(v, 3) for k, v in self.values.items()}, "reach": pairs(self.reach),
                "sleep": pairs(self.sleep), "roam_nat": pairs(self.roam_nat), "roam_public": pairs(self.roam_public),
                "notes": self.notes}

    @classmethod
    def from_json(cls, data: Mapping) -> RunResult:
        """The inverse of as_json (rounded to the millisecond)."""
        def pairs(d: Mapping[str, float | None]) -> dict[Pair, float | None]:
            return {tuple(key.split("->", 1)): v for key, v in d.items()}  # type: ignore[misc]

        return cls(reach=pairs(data["reach"]), values=dict(data["values"]), sleep=pairs(data["sleep"]),
                   roam_nat=pairs(data["roam_nat"]), roam_public=pairs(data["roam_public"]), notes=list(data["notes"]))


class Run:
    """One fresh lab, measured once through start, sleep and the two roams, then removed."""

    def __init__(self, settings: LabSettings, topo: Topology, *, sleep_s: float, log_dir: Path) -> None:
        self.lab = Lab(settings)
        self.topo = topo
        self.sleep_s = sleep_s
        self.log_dir = log_dir
        self.res = RunResult()
        self._where: dict[str, tuple[str, str]] = {}  # node -> (namespace, mesh IP) once registered

    def execute(self) -> RunResult:
        lab_id = new_lab_id()
        try:
            self._start(lab_id)
            self._sleep_and_return(self.topo.sleeper)
            self._roam_nat(self.topo.own_nat[0])
            self._roam_public(self.topo.public[1])
        finally:
            t = time.monotonic()
            self.lab.down(lab_id=lab_id)
            self.res.values["down (s)"] = time.monotonic() - t
        return self.res

    # --- start -> reachable

    def _start(self, lab_id: str) -> None:
        topo, lab = self.topo, self.lab
        errors: list[BaseException] = []
        returned: list[float] = []  # when lab.up returned (every node had its mesh IP)
        done = threading.Event()

        def up() -> None:
            try:
                lab.up(len(topo.names), lab_id=lab_id, nat=topo.own_nat,
                       nat_groups=[(GROUP, topo.shared_nat)] if topo.shared_nat else [])
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread and re-raised there
                errors.append(exc)
            finally:
                returned.append(time.time())
                done.set()

        t_begin = time.time()
        threading.Thread(target=up, daemon=True).start()
        pings = Pings(lab, self.log_dir / "start")
        registered: dict[str, float] = {}
        replies: dict[Pair, float] = {}
        all_pairs = [(a, b) for a in topo.names for b in topo.names if a != b]
        looks: list[float] = []  # when each look began: registrations are stamped at most one look late
        try:
            while len(replies) < len(all_pairs):
                looks.append(time.monotonic())
                if errors:
                    raise errors[0]
                if returned and time.time() - returned[0] > START_DEADLINE_S:
                    break
                self._look_for_registrations(pings, registered)
                for pair in list(pings.procs):
                    if pair not in replies and (stamp := pings.first_reply(pair)) is not None:
                        replies[pair] = stamp
                        pings.stop(pair)
                time.sleep(POLL_S)
        finally:
            pings.close()
        # Every pair may answer before lab.up returned (it waits for its agents one by one).
        if not done.wait(timeout=120) or errors:
            raise errors[0] if errors else TimeoutError("lab.up did not return")
        t_up = returned[0]
        self.res.values["lab.up (s)"] = t_up - t_begin
        gaps = [b - a for a, b in pairwise(looks)]
        if gaps:
            self.res.values["start: look period, max (s)"] = max(gaps)
        starts = {(a, b): max(registered[a], registered[b]) for a, b in all_pairs
                  if a in registered and b in registered}
        self.res.reach = {pair: (replies[pair] - starts[pair]) if pair in replies else None for pair in all_pairs}
        if len(replies) == len(all_pairs):
            # Negative when the last pair answered before lab.up returned.
            self.res.values["up returned -> all pairs reachable (s)"] = max(replies.values()) - t_up
            self.res.values["up called -> all pairs reachable (s)"] = max(replies.values()) - t_begin
        else:
            self.res.notes.append(f"start: {len(all_pairs) - len(replies)} pairs never answered within "
                                  f"{START_DEADLINE_S:.0f} s of lab.up returning")

    def _look_for_registrations(self, pings: Pings, registered: dict[str, float]) -> None:
        """Stamp every node that newly has a mesh IP and is registered; ping between it and every earlier one."""
        try:
            st = self.lab.state()
        except LabStateError:
            return
        for record in st.ordered_nodes():
            name = record.name
            if name in registered:
                continue
            status = self.lab.agent_status(name, timeout=1.0)
            if status is None or status.mesh_ip is None or not status.ready:
                continue
            registered[name] = time.time()
            self._where[name] = (record.namespace, status.mesh_ip)
            for other in registered:
                if other != name:
                    for src, dst in ((name, other), (other, name)):
                        pings.start(src, dst, namespace=self._where[src][0], ip=self._where[dst][1])

    # --- sleep and return

    def _sleep_and_return(self, sleeper: str) -> None:
        lab = self.lab
        peers = [n for n in self.topo.names if n != sleeper]
        lab.wait_mesh(self.topo.names, timeout=60)
        ip = lab.mesh_ip(sleeper)
        t_freeze = time.monotonic()
        lab.freeze(sleeper)
        try:
            wait_for(lambda: not holders_of(lab.views(peers), ip, among=peers), timeout=60,
                     what=f"every peer removed {sleeper}'s tunnel", interval=0.2)
            self.res.values["freeze -> removed everywhere (s)"] = time.monotonic() - t_freeze
            rest = self.sleep_s - (time.monotonic() - t_freeze)
            if rest > 0:
                time.sleep(rest)  # the sleep itself, not a wait for a condition
        finally:
            self.res.values["frozen for (s)"] = time.monotonic() - t_freeze
            t_thaw = time.time()
            lab.thaw(sleeper)
        pings = Pings(lab, self.log_dir / "sleep")
        pairs = [p for peer in peers for p in ((peer, sleeper), (sleeper, peer))]
        try:
            for src, dst in pairs:
                pings.start(src, dst)
            found = pings.wait_all(pairs, after=t_thaw, deadline_s=SLEEP_DEADLINE_S)
        finally:
            pings.close()
        self.res.sleep = since(found, t_thaw)
        if all(v is not None for v in self.res.sleep.values()):
            self.res.values["thaw -> reachable both ways from every peer (s)"] = max(
                v for v in self.res.sleep.values() if v is not None)
        status = lab.agent_status(sleeper)
        if status is None or status.mesh_ip != ip:
            self.res.notes.append(f"sleep: {sleeper} came back with mesh IP {status and status.mesh_ip}, not {ip}")

    # --- roaming

    def _roam_nat(self, roamer: str) -> None:
        self.res.roam_nat = self._roam(roamer, self.topo.roam_peers()[0], "roam_nat")

    def _roam_public(self, roamer: str) -> None:
        self.res.roam_public = self._roam(roamer, self.topo.roam_peers()[1], "roam_public")

    def _roam(self, roamer: str, peers: Sequence[str], what: str) -> dict[Pair, float | None]:
        lab = self.lab
        pairs = [p for peer in peers for p in ((roamer, peer), (peer, roamer))]
        pings = Pings(lab, self.log_dir / what)
        try:
            for src, dst in pairs:
                pings.start(src, dst)
            before = pings.wait_all(pairs, after=0.0, deadline_s=ROAM_DEADLINE_S, stop=False)
            if any(v is None for v in before.values()):
                self.res.notes.append(f"{what}: not every watched pair answered before the roam: {before}")
            removed_before = self._peers_removed(peers)
            t_call = time.time()
            lab.roam(roamer)
            t_done = time.time()
            self.res.values[f"{what}: roam call (s)"] = t_done - t_call
            found = pings.wait_all(pairs, after=t_done, deadline_s=ROAM_DEADLINE_S)
        finally:
            pings.close()
        # Whether the registrar judged the roamer unreachable meanwhile (its peers then drop it and add it again
        # with its new candidates): that decides which path the recovery takes (docs/benchmarks.md).
        removed_after = self._peers_removed(peers)
        self.res.values[f"{what}: watched peers that dropped the roamer"] = float(sum(
            1 for p in peers if removed_after.get(p, 0) > removed_before.get(p, 0)))
        return since(found, t_done)

    def _peers_removed(self, names: Sequence[str]) -> dict[str, int]:
        """Each agent's peer_removed counter (its local API); the roams watch nobody else leave meanwhile."""
        out = {}
        for name in names:
            status = self.lab.agent_status(name)
            if status is not None:
                out[name] = status.counters.get("peer_removed", 0)
        return out


# --- report ------------------------------------------------------------------------------------------------------


def kind_of_direction(src: str, dst: str, moved: str, router_of: Mapping[str, str | None]) -> str:
    """"roamer -> public" style label for a direction watched around `moved`'s roam or sleep."""
    other = dst if src == moved else src
    where = router_of[other]
    peer = "public" if where is None else ("same NAT" if where == router_of[moved] else "NAT")
    return f"it -> {peer}" if src == moved else f"{peer} -> it"


def merged(results: Sequence[RunResult], attr: str) -> list[tuple[Pair, float | None]]:
    return [(pair, v) for r in results for pair, v in getattr(r, attr).items()]


def tables(results: Sequence[RunResult], topo: Topology, header: str) -> str:
    router_of = topo.router_of()
    lines = [f"\n{header}\n", "| measure | p50 / p95 / max in s (values) |", "| --- | --- |"]
    reach: dict[str, list[float | None]] = {}
    for r in results:
        for kind, values in by_kind(r.reach, router_of).items():
            reach.setdefault(kind, []).extend(values)
    for kind, values in reach.items():
        lines.append(f"| start: registered -> reachable, {kind} (per ordered pair) | {summarize(values).cells()} |")
    keys = [k for r in results for k in r.values]
    for key in dict.fromkeys(keys):
        lines.append(f"| {key} | {summarize([r.values.get(key) for r in results]).cells()} |")
    sections = (("sleep", "sleep: thaw -> first reply", topo.sleeper),
                ("roam_nat", "NAT roam: roam done -> first reply", topo.own_nat[0]),
                ("roam_public", "public roam: roam done -> first reply", topo.public[1]))
    for attr, label, moved in sections:
        groups: dict[str, list[float | None]] = {}
        for (src, dst), v in merged(results, attr):
            groups.setdefault(kind_of_direction(src, dst, moved, router_of), []).append(v)
        for direction, values in sorted(groups.items()):
            lines.append(f"| {label}, {direction} | {summarize(values).cells()} |")
    for attr, label, moved in sections[1:]:
        for i, r in enumerate(results):
            got = getattr(r, attr)
            dropped = r.values.get(f"{attr}: watched peers that dropped the roamer")
            watched = len({b if a == moved else a for a, b in got})
            lines.append(f"| {label}, run {i + 1} | " + ", ".join(
                f"{a}->{b} {'never' if v is None else f'{v:.1f}'}" for (a, b), v in got.items())
                + ("" if dropped is None else f" ({dropped:.0f} of {watched} peers dropped it meanwhile)") + " |")
    notes = [f"run {i + 1}: {note}" for i, r in enumerate(results) for note in r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=8, help="nodes per lab, half of them behind NAT (at least 4)")
    parser.add_argument("--broker", choices=("embedded", "mosquitto"), default="embedded")
    parser.add_argument("--sleep-s", type=float, default=12.0,
                        help="how long the sleeping node stays frozen (at least until every peer removed it)")
    parser.add_argument("--json", type=Path, help="write every run's values (JSON)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep every run's lab directory (logs, pings); by default only runs with notes keep theirs")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of a saved --json file")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        print(tables([RunResult.from_json(r) for r in saved["runs"]], topology(saved["nodes"]), saved["header"]))
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, wireguard-go)")
    try:
        topo = topology(args.nodes)
    except ValueError as exc:
        parser.error(str(exc))
    results: list[RunResult] = []
    walls: list[float] = []
    load = os.getloadavg()
    t_all = time.monotonic()
    for run in range(args.runs):
        lab_dir = Path(tempfile.mkdtemp(prefix="mlnat-"))  # short: agent sockets live in it
        settings = LabSettings(lab_dir=lab_dir, broker=args.broker, heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0,
                               join_timeout_s=60.0)
        t = time.monotonic()
        measured = Run(settings, topo, sleep_s=args.sleep_s, log_dir=lab_dir / "pings")
        try:
            res = measured.execute()
        except Exception as exc:  # noqa: BLE001 - a failed run is a result too: reported, its logs kept
            traceback.print_exc()
            res = measured.res
            res.notes.append(f"run failed: {exc!r}")
        walls.append(time.monotonic() - t)
        results.append(res)
        reach = summarize(list(res.reach.values()))
        print(f"{args.broker} N={args.nodes} run {run + 1}/{args.runs} ({walls[-1]:.0f} s, logs in {lab_dir}): "
              f"reach p50 / p95 / max {reach.cells()}; "
              + ", ".join(f"{k} {v:.2f}" for k, v in res.values.items())
              + (f"; notes: {res.notes}" if res.notes else ""), flush=True)
        if not res.notes and not args.keep_logs:
            shutil.rmtree(lab_dir, ignore_errors=True)
    total = time.monotonic() - t_all
    load_after = os.getloadavg()
    header = (f"{args.broker}, N={args.nodes} ({len(topo.public)} public, {len(topo.own_nat)} behind NATs of their "
              f"own, {len(topo.shared_nat)} behind one shared NAT), {args.runs} runs, {total:.0f} s in all; "
              f"load average {load[0]:.1f} before, {load_after[0]:.1f} after")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "nodes": args.nodes, "broker": args.broker,
                                         "sleep_s": args.sleep_s,
                                         "wall_s": [round(w, 1) for w in walls], "load": [load, load_after],
                                         "runs": [r.as_json() for r in results]}, indent=1))
    print(tables(results, topo, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
