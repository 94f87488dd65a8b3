"""What a chaos run reports: log lines in a time window, the nodes a finding names, regression files."""

from __future__ import annotations

import time

from meshlab.chaosreport import lines_between, nodes_named, regression_name, regression_record
from meshlab.invariants import Finding
from meshlab.schedule import Schedule, Step


def _at(hms: str) -> float:
    day = time.localtime()
    h, m, s = (float(x) for x in hms.split(":"))
    return time.mktime((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0, 0, 0, -1)) + h * 3600 + m * 60 + s


LOG = """10:00:01.000 INFO  a: before
10:00:05.500 INFO  a: inside
Traceback (most recent call last):
  boom
10:00:09.000 INFO  a: after
"""


def test_lines_between_keeps_stamped_lines_and_their_continuations():
    assert lines_between(LOG, start=_at("10:00:05"), end=_at("10:00:06")) == [
        "10:00:05.500 INFO  a: inside", "Traceback (most recent call last):", "  boom"]
    assert lines_between(LOG, start=_at("10:00:00"), end=_at("10:00:10"), limit=2) == ["  boom",
                                                                                      "10:00:09.000 INFO  a: after"]


def test_nodes_named_in_index_order():
    found = [Finding("x", "n10->n2", "n2 holds no tunnel to n10; registrar says n3 ...")]
    assert nodes_named(found) == ["n2", "n3", "n10"]


def test_regression_files_name_the_invariant_broker_and_seed():
    schedule = Schedule(nodes=4, broker="embedded", interval_s=1.0, ttl_s=3.0, stable=("n1", "n2"),
                        steps=(Step(1.0, "kill", ("n3",)), Step(1.0, "start", ("n3",), settle=True)), seed=5)
    assert regression_name(schedule, "views-converge") == "views-converge-embedded-seed5.json"
    record = regression_record(schedule, invariant="views-converge", evidence="e", found_with={"seed": 5},
                               xfail="known bug")
    assert Schedule.from_dict(record["schedule"]) == schedule and record["xfail"] == "known bug"
