"""`meshlab chaos`: run a schedule of overlapping faults against a lab and check every invariant as it settles.

The runner builds a lab for the schedule (or drives the one in the lab directory), keeps a stamped continuous
ping between every pair of stable nodes, and executes the steps: wait the gap, do the action through the lab
(meshlab.lab, meshlab.faults), note since when each node is in its condition and since when the control plane
is up. After a settle step it looks at the lab until no finding is pending (meshlab.checkloop) and records each
violation with the log lines around it. The schedule is generated (meshlab.schedule) or replayed from a file;
a failing one can be shrunk (meshlab.shrink) and saved as a regression. Nothing here decides what is right:
that is meshlab.invariants.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshlab.chaosreport import event_line, lines_between, nodes_named
from meshlab.checkloop import describe, settle
from meshlab.context import Report, quiet
from meshlab.errors import LabError
from meshlab.invariants import Bounds, Finding, Memory, check, check_leftovers
from meshlab.lab import Lab, new_lab_id
from meshlab.meshview import new_losses, probes_sent
from meshlab.schedule import CONTROL, Schedule, Step, close, replay_model
from meshlab.settings import LabSettings
from meshlab.shrink import shrink, truncate
from meshlab.snapshot import SILENT, PairLoss
from meshlab.survey import conditions, leftovers, look
from meshlab.traffic import ContinuousPing

STEP_FAILED = "step-failed"  # a lab action raised: the run stops there and it counts as a violation
LOSS_GRACE_S = 2.0
WATCH_S = 30.0  # after a violation, how long to keep looking to tell a slow mesh from a stuck one  # a probe is lost only if no reply came this long after ping named it unanswered


def _klass(condition: str | None) -> str | None:
    return "silent" if condition in SILENT else condition


@dataclass(slots=True)
class RunResult:
    """What one run did and found. `schedule` is what really ran (cut short by a duration, if one was set)."""

    schedule: Schedule
    events: list[dict] = field(default_factory=list)
    violations: list[dict] = field(default_factory=list)
    checks: int = 0
    steps_run: int = 0
    took_s: float = 0.0
    lab_id: str | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    def first_violation(self) -> dict | None:
        return self.violations[0] if self.violations else None

    def to_dict(self) -> dict:
        return {"ok": self.ok, "lab_id": self.lab_id, "took_s": round(self.took_s, 2), "checks": self.checks,
                "steps_run": self.steps_run,
                "faults": replace(self.schedule, steps=self.schedule.steps[: self.steps_run]).faults(),
                "violations": self.violations,
                "timeline": self.events, "schedule": self.schedule.to_dict()}


class ChaosRun:
    """One run of one schedule. `build`: make a fresh lab for it and remove it at the end (leaks checked)."""

    def __init__(self, settings: LabSettings, schedule: Schedule, *, report: Report = quiet, build: bool = True,
                 keep_going: bool = False, probe: bool = True, duration_s: float | None = None,
                 lab_report: Report = quiet) -> None:
        self.settings = settings.model_copy(update={
            "broker": schedule.broker, "heartbeat_interval_s": schedule.interval_s,
            "heartbeat_ttl_s": schedule.ttl_s}) if build else settings
        self.schedule = schedule
        self.report = report
        self.build = build
        self.keep_going = keep_going
        self.probe = probe
        self.duration_s = duration_s
        self.lab = Lab(self.settings, report=lab_report)
        self.bounds = Bounds.for_lab(interval_s=schedule.interval_s, ttl_s=schedule.ttl_s)
        self.result = RunResult(schedule=schedule)
        self.memory = Memory()
        self.since: dict[str, float] = {}
        self.control_since: float | None = None
        self.pingers: dict[tuple[str, str], ContinuousPing] = {}
        self.reported: dict[tuple[str, str], set[int]] = {}
        self.counted: dict[tuple[str, str], int] = {}
        self.start = time.monotonic()

    # --- the run -----------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Run the schedule; every exit path stops the traffic, and a lab this run built is removed."""
        self.start = time.monotonic()
        try:
            self._prepare()
            self._event("check", "the lab before the first fault")
            if self._check(step=None) or self.keep_going:
                self._steps()
        except LabError as exc:
            self._violation(Finding(STEP_FAILED, "lab", str(exc)), step=self.result.steps_run or None)
        finally:
            self._finish()
        self.result.took_s = time.monotonic() - self.start
        return self.result

    def _prepare(self) -> None:
        if self.build:
            lab_id = new_lab_id()
            self.result.lab_id = lab_id
            self._event("lab", f"up: {self.schedule.nodes} nodes, {self.schedule.broker} broker, heartbeat "
                               f"{self.schedule.interval_s:g} s, TTL {self.schedule.ttl_s:g} s (lab {lab_id})")
            self.lab.up(self.schedule.nodes, lab_id=lab_id)
        else:
            st = self.lab.state()
            self.result.lab_id = st.lab_id
            names = [n.name for n in st.ordered_nodes()]
            if names != [f"n{i}" for i in range(1, self.schedule.nodes + 1)]:
                raise LabError(f"the schedule needs nodes n1..n{self.schedule.nodes}; this lab has {names}")
        self.lab.wait_mesh(timeout=self.settings.join_timeout_s)
        now = time.time()
        self.since = {name: now for name in conditions(self.lab)}
        self.control_since = now
        stable = list(self.schedule.stable)
        for i, src in enumerate(stable):
            for dst in stable[i + 1:]:
                self.pingers[(src, dst)] = self.lab.start_pinger(src, dst, stamped=True)
                self.reported[(src, dst)] = set()
                self.counted[(src, dst)] = 0
        self._event("traffic", "continuous ping between stable pairs: " + ", ".join(f"{a}->{b}" for a, b in self.pingers))

    def _steps(self) -> None:
        steps = list(self.schedule.steps)
        i = 0
        checked = True  # whether the last step run has been checked
        while i < len(steps):
            step = steps[i]
            if self.duration_s is not None and time.monotonic() - self.start > self.duration_s:
                steps = self._cut_short(steps, i)
                self.duration_s = None
                continue
            time.sleep(step.gap_s)
            self._do(step, index=i + 1)
            self.result.steps_run = i + 1
            checked = step.settle or i == len(steps) - 1
            if checked:
                if not self._check(step=i + 1) and not self.keep_going:
                    # Stop where it failed, but end every open fault so a lab we did not build stays usable.
                    if not self.build:
                        for closing in self._closing(steps[: i + 1]):
                            self._do(closing, index=None)
                    break
            i += 1
        if not checked:  # cut short with nothing left open: the last step still gets its check
            self._check(step=self.result.steps_run)

    def _cut_short(self, steps: list[Step], at: int) -> list[Step]:
        """The duration is over: the steps done so far, then the steps that end every open fault."""
        done = steps[:at]
        ending = self._closing(done)
        if ending:
            ending[-1] = replace(ending[-1], settle=True)
        self.result.schedule = replace(self.schedule, steps=tuple(done + ending))
        self._event("note", f"duration reached after {at} steps: ending the {len(ending)} open fault(s)")
        return done + ending

    def _closing(self, done: list[Step]) -> list[Step]:
        return close(replay_model(replace(self.schedule, steps=tuple(done))), interval_s=self.schedule.interval_s)

    def _do(self, step: Step, *, index: int | None) -> None:
        before = conditions(self.lab)
        self._event("step", step.label(), step=index)
        act = self._actions()[step.action]
        act(step)
        now = time.time()
        after = conditions(self.lab)
        for name, cond in after.items():
            if name in step.nodes or _klass(before.get(name)) != _klass(cond):
                self.since[name] = now
        if step.action in CONTROL:
            self.control_since = None
        elif step.action in ("registrar-start", "broker-start"):
            self.control_since = now

    def _actions(self) -> dict[str, Callable[[Step], object]]:
        lab, faults = self.lab, self.lab.faults

        def one(fn: Callable[[str], object]) -> Callable[[Step], object]:
            return lambda s: fn(s.nodes[0])

        def join(step: Step) -> None:
            record = lab.add(wait=False)
            if record.name != step.nodes[0]:
                raise LabError(f"join made {record.name}, the schedule expected {step.nodes[0]}")

        return {
            "kill": one(lab.kill), "crash": one(lab.crash), "freeze": one(lab.freeze), "thaw": one(lab.thaw),
            "leave": one(lab.stop), "start": lambda s: lab.start(s.nodes[0], wait=False),
            "partition": one(lab.partition), "heal": one(lab.heal),
            "isolate": lambda s: faults.isolate(s.nodes), "rejoin": lambda s: faults.rejoin(s.nodes),
            "cut-control": one(faults.cut_control), "restore-control": one(faults.restore_control),
            "loss": lambda s: faults.loss(s.nodes[0], s.percent), "clear-loss": lambda s: faults.loss(s.nodes[0], 0),
            "registrar-kill": lambda s: faults.kill_registrar(), "registrar-start": lambda s: lab.registrar("start"),
            "broker-stop": lambda s: lab.broker("stop"), "broker-start": lambda s: lab.broker("start"),
            "join": join, "reinstall": one(faults.reinstall),
        }

    # --- checks ----------------------------------------------------------------------------------------------

    def _losses(self, *, grace_s: float = LOSS_GRACE_S) -> list[PairLoss]:
        out = []
        now = time.time()
        for pair, pinger in self.pingers.items():
            text = pinger.output()
            lost = new_losses(text, now=now, reported=self.reported[pair], grace_s=grace_s)
            sent = probes_sent(text)
            out.append(PairLoss(pair[0], pair[1], sent - self.counted[pair], tuple(lost)))
            self.counted[pair] = sent
            self.reported[pair].update(seq for seq, _ in lost)
        return out

    def _check(self, *, step: int | None) -> bool:
        verdict, self.memory = settle(self.lab, bounds=self.bounds, memory=self.memory, since=self.since,
                                      control_since=self.control_since, traffic=self._losses(), probe=self.probe,
                                      limit_s=self.bounds.settle_s + 10)
        self.result.checks += 1
        found = list(verdict.violations)
        # Out of time with findings pending: the limit is a bound too.
        found += [replace(f, evidence=f.evidence + " (still pending at the check's limit)") for f in verdict.pending]
        if found:
            cleared = self._watch([(f.invariant, f.subject) for f in found])
            for finding in found:
                self._violation(finding, step=step, snapshot=verdict.snapshot.to_dict() if verdict.snapshot else None,
                                cleared_after_s=cleared.get((finding.invariant, finding.subject)))
        waited = sorted({f.invariant for f in verdict.first_pending})
        self._event("check", f"{'ok' if verdict.ok and not verdict.pending else 'VIOLATED'}: {verdict.looks} "
                             f"look(s) in {verdict.took_s:.1f} s"
                             + (f", waited for {len(verdict.first_pending)} pending ({', '.join(waited)})"
                                if waited else ""), step=step)
        return verdict.ok and not verdict.pending

    def _watch(self, keys: list[tuple[str, str]], *, limit_s: float = WATCH_S) -> dict[tuple[str, str], float]:
        """After a violation, keep looking (up to `limit_s`) to tell slow from stuck: seconds until each
        (invariant, subject) was no longer found; absent if it never cleared."""
        start = time.monotonic()
        left, cleared = set(keys), {}
        memory = self.memory
        while left and time.monotonic() - start < limit_s:
            snap = look(self.lab, since=self.since, control_since=self.control_since, probe=self.probe)
            findings, memory = check(snap, bounds=self.bounds, memory=memory)
            still = {(f.invariant, f.subject) for f in findings}
            for key in left - still:
                cleared[key] = round(time.monotonic() - start, 1)
            left &= still
            time.sleep(1.0)
        return cleared

    def _violation(self, finding: Finding, *, step: int | None, snapshot: dict | None = None,
                   cleared_after_s: float | None = None) -> None:
        now = time.time()
        logs = {}
        store = self.lab.store
        window = (now - 2 * self.bounds.settle_s, now)
        for name in ["registrar", *nodes_named([finding])]:
            path = store.control_dir / "registrar.log" if name == "registrar" else store.agent_log(name)
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            logs[name] = lines_between(text, start=window[0], end=window[1])
        record = {"step": step, "at": now, **finding.to_dict(), "logs": logs, "snapshot": snapshot}
        if snapshot is not None:
            # Watched for WATCH_S after the check: None means it was still there (stuck, not slow).
            record["cleared_after_s"] = cleared_after_s
        self.result.violations.append(record)
        after = ("" if snapshot is None else f" (cleared {cleared_after_s} s later)" if cleared_after_s is not None
                 else f" (still there {WATCH_S:.0f} s later)")
        self._event("violation", describe(finding) + after, step=step)

    def _finish(self) -> None:
        for pinger in self.pingers.values():
            try:
                pinger.stop()
            except LabError:
                pass  # a pinger that will not stop goes with its namespace on down
        if self.pingers:
            # The stop's own last probe may be in flight; everything before it has had its chance.
            for loss in self._losses(grace_s=0.0):
                if loss.lost:
                    self._violation(Finding("zero-loss-on-stable-pairs", f"{loss.src}->{loss.dst}",
                                            f"{len(loss.lost)} probes lost at the end: {list(loss.lost)[:10]}"),
                                    step=None)
        if self.build:
            self.lab.down()
            if self.result.lab_id:
                for finding in check_leftovers(leftovers(self.result.lab_id, self.settings.lab_dir)):
                    self._violation(finding, step=None)
            self._event("lab", "down")

    def _event(self, kind: str, text: str, *, step: int | None = None) -> None:
        elapsed = time.monotonic() - self.start
        self.result.events.append({"t": round(elapsed, 3), "wall": round(time.time(), 3), "kind": kind,
                                   "step": step, "text": text})
        prefix = f"#{step} " if step is not None else ""
        self.report(event_line(elapsed, kind, prefix + text))


def run_schedule(settings: LabSettings, schedule: Schedule, **kwargs) -> RunResult:
    """Run `schedule` once (see ChaosRun for the keyword arguments)."""
    return ChaosRun(settings, schedule, **kwargs).run()


def shrink_failure(settings: LabSettings, schedule: Schedule, result: RunResult, *, runs: int,
                   report: Report = quiet) -> Schedule:
    """The smallest schedule found within `runs` fresh-lab runs that still violates the first violated invariant.

    The schedule is first cut after the step whose check failed (and closed); each candidate is run in a lab of
    its own, stopping at its first failing check.
    """
    first = result.first_violation()
    assert first is not None
    invariant = first["invariant"]
    last = (first["step"] or len(schedule.steps)) - 1
    start = truncate(schedule, max(last, 0))

    def fails(candidate: Schedule) -> bool:
        outcome = ChaosRun(settings, candidate, report=quiet).run()
        hit = any(v["invariant"] == invariant for v in outcome.violations)
        report(f"shrink: {len(candidate.steps)} steps -> {'still fails' if hit else 'passes'}")
        return hit

    report(f"shrink: {invariant} at step {first['step']}; up to {runs} runs from {len(start.steps)} steps")
    if runs > 0 and not fails(start):
        report("shrink: the cut schedule does not fail again (timing?); keeping the whole one")
        return schedule
    return shrink(start, fails, budget=max(runs - 1, 0), report=report)


def load_schedule(path: Path) -> Schedule:
    """A schedule from a file: a --json result, a regression file or a bare schedule."""
    import json

    data = json.loads(Path(path).read_text())
    return Schedule.from_dict(data.get("schedule", data))
