"""Chaos schedules: reproducible from a seed, valid step by step, closed at the end; shrinking keeps them valid."""

from __future__ import annotations

import json

import pytest

from meshlab.schedule import Schedule, Step, generate, replay_model, stable_nodes
from meshlab.shrink import episodes, shrink, truncate, without


@pytest.mark.parametrize(("nodes", "broker"), [(3, "embedded"), (4, "mosquitto"), (6, "embedded"), (8, "mosquitto")])
@pytest.mark.parametrize("seed", range(25))
def test_generated_schedules_are_valid_and_closed(seed, nodes, broker):
    schedule = generate(seed=seed, nodes=nodes, steps=30, broker=broker)
    model = replay_model(schedule)  # raises on the first step that does not fit
    assert not model.process.keys() - model.gone and not any(model.network.values()) and not model.control
    assert schedule.steps[-1].settle
    touched = {n for s in schedule.steps for n in s.nodes}
    assert not touched & set(stable_nodes(nodes)), "a fault touched a stable node"


def test_same_seed_same_schedule_and_json_round_trip():
    a = generate(seed=42, nodes=6, steps=30, broker="mosquitto")
    assert a == generate(seed=42, nodes=6, steps=30, broker="mosquitto")
    assert a != generate(seed=43, nodes=6, steps=30, broker="mosquitto")
    assert Schedule.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_gaps_include_shorter_than_a_heartbeat_and_longer_than_a_ttl():
    gaps = [s.gap_s for seed in range(10) for s in generate(seed=seed, nodes=6, steps=30, broker="embedded").steps]
    assert min(gaps) < 1.0 and max(gaps) >= 3.0


def test_every_fault_kind_is_drawn():
    kinds = set()
    for seed in range(40):
        kinds |= set(generate(seed=seed, nodes=6, steps=30, broker="mosquitto").faults())
    assert kinds >= {"kill", "crash", "freeze", "leave", "partition", "isolate", "cut-control", "loss",
                     "registrar-kill", "broker-stop", "join", "reinstall"}


def _schedule(*steps: Step, nodes: int = 4) -> Schedule:
    return Schedule(nodes=nodes, broker="mosquitto", interval_s=1.0, ttl_s=3.0, stable=("n1", "n2"), steps=steps)


@pytest.mark.parametrize(
    ("steps", "problem"),
    [
        ((Step(0, "thaw", ("n3",)),), "not frozen"),
        ((Step(0, "freeze", ("n1",)),), "no victim"),
        ((Step(0, "kill", ("n3",)), Step(0, "freeze", ("n3",))), "already has kill"),
        ((Step(0, "join", ("n9",)),), "join must name n5"),
        ((Step(0, "broker-stop"), Step(0, "registrar-kill"), Step(0, "registrar-start")), "broker is down"),
        ((Step(0, "registrar-kill"), Step(0, "reinstall", ("n3",))), "control plane up"),
    ],
)
def test_invalid_schedules_are_refused(steps, problem):
    with pytest.raises(ValueError, match=problem):
        replay_model(_schedule(*steps))


STEPS = (
    Step(1, "freeze", ("n3",)),           # 0  episode A (0, 2)
    Step(1, "join", ("n5",)),             # 1  episode B
    Step(1, "thaw", ("n3",)),             # 2
    Step(1, "loss", ("n5",), percent=10),  # 3  episode C (3, 5), depends on B
    Step(1, "join", ("n6",)),             # 4  episode D
    Step(1, "clear-loss", ("n5",)),       # 5
    Step(1, "kill", ("n6",)),             # 6  episode E (6, 7)
    Step(1, "start", ("n6",), settle=True),
)


def test_episodes_pair_begins_with_their_ends():
    assert episodes(STEPS) == [(0, 2), (1,), (3, 5), (4,), (6, 7)]


def test_removing_a_join_removes_what_depends_on_it_and_renames_later_joins():
    smaller = without(_schedule(*STEPS), {1})
    assert [s.label() for s in smaller.steps] == ["freeze n3", "thaw n3", "join n5", "kill n5", "start n5"]
    replay_model(smaller)
    assert smaller.steps[-1].settle


def test_truncate_closes_open_faults():
    cut = truncate(_schedule(*STEPS), 3)
    assert [s.action for s in cut.steps][-1] == "clear-loss" and cut.steps[-1].settle
    replay_model(cut)


def test_shrink_finds_the_one_episode_that_matters_within_its_budget():
    runs = []

    def fails(candidate: Schedule) -> bool:
        runs.append(candidate)
        return any(s.action == "kill" for s in candidate.steps)

    small = shrink(_schedule(*STEPS), fails, budget=20)
    assert [s.label() for s in small.steps] == ["join n5", "kill n5", "start n5"]
    assert len(runs) <= 20
    replay_model(small)
    assert shrink(_schedule(*STEPS), fails, budget=0) == _schedule(*STEPS)


def test_saved_regressions_are_valid_schedules():
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "system" / "chaos_regressions"
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        assert record["invariant"] and "schedule" in record, path
        replay_model(Schedule.from_dict(record["schedule"]))  # every step fits the lab it needs
