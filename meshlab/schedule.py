"""Chaos schedules: a seeded, reproducible list of overlapping faults with gaps between them. No I/O here.

A schedule is a list of steps; each waits `gap_s` and then does one action on the lab. Faults come in
episodes, a begin and its end (freeze ... thaw), which overlap freely across nodes and with the control plane;
joins and reinstalls are episodes of one step. Gaps are drawn relative to the heartbeat interval, many of them
shorter than one heartbeat, so faults begin and end between two heartbeats. A step marked `settle` lets the
system settle afterwards and is checked (the runner looks until nothing is pending); the others follow one
another after their gaps only. The last step always settles, and every fault still open at the end is ended
first, except a graceful leave that was drawn as permanent.

The first nodes are stable: no fault ever touches them, and the runner keeps traffic between them, which must
lose nothing whatever happens elsewhere.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace

SCHEDULE_VERSION = 1

# begin -> end of each fault episode
ENDS = {
    "kill": "start", "crash": "start", "freeze": "thaw", "leave": "start",
    "partition": "heal", "isolate": "rejoin", "cut-control": "restore-control", "loss": "clear-loss",
    "registrar-kill": "registrar-start", "broker-stop": "broker-start",
}
INSTANT = ("join", "reinstall")
PROCESS = ("kill", "crash", "freeze", "leave")  # one at a time per node
NETWORK = ("partition", "isolate", "cut-control", "loss")
CONTROL = ("registrar-kill", "broker-stop")
ACTIONS = tuple(ENDS) + tuple(ENDS.values()) + INSTANT
MAX_JOINS = 3
GAPS = (0.2, 0.5, 1.0, 2.0)  # x heartbeat interval; TTL-long gaps are added in gap()
# How often each kind of fault is drawn among those valid at a step (then its target, uniformly).
WEIGHTS = {"kill": 2.0, "crash": 1.0, "freeze": 2.0, "leave": 1.0, "reinstall": 0.6, "partition": 1.0,
           "cut-control": 1.5, "loss": 1.0, "isolate": 1.0, "registrar-kill": 1.0, "broker-stop": 1.0, "join": 0.7}


@dataclass(frozen=True, slots=True)
class Step:
    """Wait `gap_s`, then do `action` on `nodes` (none for control-plane actions; the new name for a join)."""

    gap_s: float
    action: str
    nodes: tuple[str, ...] = ()
    percent: int = 0  # loss only
    settle: bool = False
    permanent: bool = False  # a leave that is never undone

    def label(self) -> str:
        target = ",".join(self.nodes)
        extra = f" {self.percent}%" if self.action == "loss" else ""
        return f"{self.action}{' ' + target if target else ''}{extra}{' (for good)' if self.permanent else ''}"

    @classmethod
    def from_dict(cls, data: dict) -> Step:
        if data["action"] not in ACTIONS:
            raise ValueError(f"unknown action {data['action']!r}")
        return cls(gap_s=float(data["gap_s"]), action=data["action"], nodes=tuple(data.get("nodes", ())),
                   percent=int(data.get("percent", 0)), settle=bool(data.get("settle", False)),
                   permanent=bool(data.get("permanent", False)))


@dataclass(frozen=True, slots=True)
class Schedule:
    """Everything needed to run (or replay) one chaos run: the lab it needs and its steps."""

    nodes: int
    broker: str
    interval_s: float
    ttl_s: float
    stable: tuple[str, ...]
    steps: tuple[Step, ...]
    seed: int | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["version"] = SCHEDULE_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        if data.get("version", SCHEDULE_VERSION) != SCHEDULE_VERSION:
            raise ValueError(f"schedule version {data.get('version')} is not {SCHEDULE_VERSION}")
        return cls(nodes=int(data["nodes"]), broker=data["broker"], interval_s=float(data["interval_s"]),
                   ttl_s=float(data["ttl_s"]), stable=tuple(data["stable"]), seed=data.get("seed"),
                   steps=tuple(Step.from_dict(s) for s in data["steps"]))

    def faults(self) -> dict[str, int]:
        """How many times each action occurs (for reports)."""
        counts: dict[str, int] = {}
        for step in self.steps:
            counts[step.action] = counts.get(step.action, 0) + 1
        return counts


@dataclass(slots=True)
class LabModel:
    """What a schedule has done to the lab so far: which faults are open, on whom. Used to draw valid steps,
    to close a schedule and to check one read from a file."""

    broker: str
    nodes: list[str]
    stable: set[str]
    process: dict[str, str] = field(default_factory=dict)  # node -> open process fault
    network: dict[str, set[str]] = field(default_factory=dict)  # node -> open network faults
    groups: list[tuple[str, ...]] = field(default_factory=list)  # open isolate groups
    loss: dict[str, int] = field(default_factory=dict)
    control: list[str] = field(default_factory=list)  # open control-plane faults, in order
    gone: set[str] = field(default_factory=set)  # left for good
    joins: int = 0

    def victims(self) -> list[str]:
        return [n for n in self.nodes if n not in self.stable and n not in self.gone]

    def next_name(self) -> str:
        return f"n{max(int(n[1:]) for n in self.nodes) + 1}"

    def open_count(self) -> int:
        return len(self.process) + sum(len(v) for v in self.network.values()) + len(self.control)

    def apply(self, step: Step) -> None:
        """Record `step`; ValueError if it is not valid now (a schedule file that does not fit)."""
        a, ns = step.action, step.nodes
        if a in ("join", "reinstall", "isolate") or a in CONTROL or a in PROCESS or a in NETWORK:
            for n in ns if a != "join" else ():
                if n not in self.nodes or n in self.stable:
                    raise ValueError(f"{step.label()}: {n} is no victim node")
        if a == "join":
            if ns != (self.next_name(),):
                raise ValueError(f"join must name {self.next_name()}, not {ns}")
            self.nodes.append(ns[0])
            self.joins += 1
        elif a in PROCESS:
            if ns[0] in self.process:
                raise ValueError(f"{step.label()}: {ns[0]} already has {self.process[ns[0]]}")
            self.process[ns[0]] = a
            if step.permanent:
                self.gone.add(ns[0])
        elif a == "start":
            if self.process.pop(ns[0], None) not in ("kill", "crash", "leave"):
                raise ValueError(f"start {ns[0]}: its agent is not down")
        elif a == "thaw":
            if self.process.pop(ns[0], None) != "freeze":
                raise ValueError(f"thaw {ns[0]}: not frozen")
        elif a in NETWORK:
            for n in ns:
                if a in self.network.get(n, set()):
                    raise ValueError(f"{step.label()}: {n} already has {a}")
                self.network.setdefault(n, set()).add(a)
            if a == "isolate":
                self.groups.append(ns)
            if a == "loss":
                self.loss[ns[0]] = step.percent
        elif a in ("heal", "rejoin", "restore-control", "clear-loss"):
            begin = next(b for b, e in ENDS.items() if e == a)
            for n in ns:
                if begin not in self.network.get(n, set()):
                    raise ValueError(f"{step.label()}: {n} has no {begin}")
                self.network[n].discard(begin)
            if a == "rejoin":
                self.groups.remove(ns)
        elif a in CONTROL:
            if a in self.control or (self.broker == "embedded" and self.control):
                raise ValueError(f"{step.label()}: the control plane already has {self.control}")
            self.control.append(a)
        elif a in ("registrar-start", "broker-start"):
            begin = next(b for b, e in ENDS.items() if e == a)
            if begin not in self.control:
                raise ValueError(f"{a}: no {begin} open")
            if a == "registrar-start" and "broker-stop" in self.control:
                raise ValueError("registrar-start while the broker is down: the registrar would never be ready")
            self.control.remove(begin)
        elif a == "reinstall":
            if self.control or ns[0] in self.process:
                raise ValueError(f"reinstall {ns[0]} needs the control plane up and the node's agent running")

    def closing(self) -> list[Step]:
        """End steps for every open fault (control plane first: broker, then registrar)."""
        out = [Step(0.0, ENDS[a]) for a in sorted(self.control, key=lambda a: a != "broker-stop")]
        for n, a in sorted(self.process.items()):
            if n not in self.gone:
                out.append(Step(0.0, ENDS[a], (n,)))
        for group in self.groups:
            out.append(Step(0.0, "rejoin", group))
        for n, kinds in sorted(self.network.items()):
            out += [Step(0.0, ENDS[k], (n,)) for k in sorted(kinds) if k != "isolate"]
        return out


def stable_nodes(nodes: int) -> tuple[str, ...]:
    """The nodes no fault touches: two in a small lab, three from six nodes on (at least two victims remain)."""
    return tuple(f"n{i}" for i in range(1, (3 if nodes >= 6 else 2) + 1))


def gap(rng: random.Random, *, interval_s: float, ttl_s: float) -> float:
    """A gap before a step: mostly around one heartbeat (many shorter), sometimes a whole TTL or more."""
    if rng.random() < 0.2:
        return round(ttl_s + rng.choice((0.0, interval_s, 2 * interval_s)), 3)
    return round(rng.choice(GAPS) * interval_s, 3)


def _candidates(model: LabModel, rng: random.Random) -> list[Step]:
    """Every begin or instant step valid now (gap and settle are drawn later)."""
    out: list[Step] = []
    victims = model.victims()
    for n in victims:
        if n not in model.process:
            out += [Step(0, a, (n,)) for a in ("kill", "crash", "freeze")]
            out.append(Step(0, "leave", (n,), permanent=rng.random() < 0.25))
            if not model.control:
                out.append(Step(0, "reinstall", (n,)))
        held = model.network.get(n, set())
        if not held & {"partition", "isolate"}:
            out.append(Step(0, "partition", (n,)))
        if "cut-control" not in held:
            out.append(Step(0, "cut-control", (n,)))
        if "loss" not in held:
            out.append(Step(0, "loss", (n,), percent=rng.choice((5, 10, 20, 30))))
    free = [n for n in victims if not model.network.get(n, set()) & {"partition", "isolate"}]
    if len(free) >= 2:
        out.append(Step(0, "isolate", tuple(sorted(rng.sample(free, rng.randint(2, min(3, len(free)))),
                                                   key=lambda n: int(n[1:])))))
    for a in CONTROL:
        if a not in model.control and not (model.broker == "embedded" and model.control):
            out.append(Step(0, a))
    if not model.control and model.joins < MAX_JOINS:
        out.append(Step(0, "join", (model.next_name(),)))
    return out


def _end_candidates(model: LabModel) -> list[Step]:
    out = [Step(0, ENDS[a], (n,)) for n, a in sorted(model.process.items()) if n not in model.gone]
    out += [Step(0, "rejoin", g) for g in model.groups]
    out += [Step(0, ENDS[k], (n,)) for n, kinds in sorted(model.network.items()) for k in sorted(kinds)
            if k != "isolate"]
    for a in model.control:
        if not (a == "registrar-kill" and "broker-stop" in model.control):
            out.append(Step(0, ENDS[a]))
    return out


def generate(*, seed: int, nodes: int, steps: int, broker: str, interval_s: float = 1.0, ttl_s: float = 3.0,
             settle_share: float = 0.35, max_open: int = 3) -> Schedule:
    """A schedule of about `steps` steps (plus the closing ones) for a lab of `nodes`, the same for the same
    arguments. At most `max_open` faults are open at once, so the mesh keeps healthy members to check."""
    if nodes < 3:
        raise ValueError("a chaos run needs at least 3 nodes: two stable ones and a victim")
    rng = random.Random(seed)
    stable = stable_nodes(nodes)
    model = LabModel(broker=broker, nodes=[f"n{i}" for i in range(1, nodes + 1)], stable=set(stable))
    out: list[Step] = []
    while len(out) < steps:
        open_now = model.open_count()
        ends = _end_candidates(model)
        if ends and (open_now >= max_open or rng.random() < open_now / (open_now + 2)):
            step = rng.choice(ends)
        else:
            begins = _candidates(model, rng)
            if not begins:
                step = rng.choice(ends)
            else:
                kinds = sorted({b.action for b in begins})
                kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
                step = rng.choice([b for b in begins if b.action == kind])
        step = replace(step, gap_s=gap(rng, interval_s=interval_s, ttl_s=ttl_s),
                       settle=rng.random() < settle_share)
        model.apply(step)
        out.append(step)
    out += close(model, rng=rng, interval_s=interval_s)
    out[-1] = replace(out[-1], settle=True)
    return Schedule(nodes=nodes, broker=broker, interval_s=interval_s, ttl_s=ttl_s, stable=stable,
                    steps=tuple(out), seed=seed)


def close(model: LabModel, *, rng: random.Random | None = None, interval_s: float = 1.0) -> list[Step]:
    """The steps that end every open fault (applied to `model`); empty if none is open."""
    rng = rng or random.Random(0)
    ending = [replace(s, gap_s=round(rng.choice(GAPS) * interval_s, 3)) for s in model.closing()]
    for step in ending:
        model.apply(step)
    return ending


def replay_model(schedule: Schedule) -> LabModel:
    """Apply every step of `schedule` to a fresh model: ValueError naming the first step that does not fit."""
    model = LabModel(broker=schedule.broker, nodes=[f"n{i}" for i in range(1, schedule.nodes + 1)],
                     stable=set(schedule.stable))
    for i, step in enumerate(schedule.steps):
        try:
            model.apply(step)
        except (ValueError, StopIteration) as exc:
            raise ValueError(f"step {i + 1} ({step.label()}): {exc}") from None
    return model
