"""bench/bench_nat.py's pure part: where nodes sit, kinds of pairs, stamped ping replies, percentiles, summaries.

docs/benchmarks.md quotes these figures; the bench itself needs root and minutes, so its pure part is tested here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "bench_nat.py"
_spec = importlib.util.spec_from_file_location("bench_nat", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


@pytest.mark.parametrize(
    ("nodes", "public", "own", "shared"),
    [
        (8, ("n1", "n2", "n3", "n4"), ("n5", "n6"), ("n7", "n8")),
        (4, ("n1", "n2"), ("n3", "n4"), ()),  # two NATed: no shared NAT, or NAT<->NAT would be missing
        (5, ("n1", "n2", "n3"), ("n4", "n5"), ()),  # the odd node is public
        (6, ("n1", "n2", "n3"), ("n4",), ("n5", "n6")),
    ],
)
def test_half_the_nodes_sit_behind_nat(nodes, public, own, shared):
    topo = bench.topology(nodes)
    assert (topo.public, topo.own_nat, topo.shared_nat) == (public, own, shared)
    assert topo.names == [f"n{i}" for i in range(1, nodes + 1)]


def test_fewer_than_four_nodes_are_refused():
    with pytest.raises(ValueError, match="at least 4"):
        bench.topology(3)


ROUTERS = bench.topology(8).router_of()


@pytest.mark.parametrize(
    ("a", "b", "kind"),
    [
        ("n1", "n2", "public<->public"),
        ("n1", "n5", "public<->NAT"),
        ("n7", "n4", "public<->NAT"),
        ("n5", "n6", "NAT<->NAT"),  # two routers of their own
        ("n6", "n8", "NAT<->NAT"),  # own router and the shared one
        ("n7", "n8", "same NAT"),
        ("n8", "n7", "same NAT"),
    ],
)
def test_pair_kinds(a, b, kind):
    assert bench.pair_kind(a, b, ROUTERS) == kind


def test_pairs_grouped_by_kind_keep_failures_and_order():
    times = {("n1", "n2"): 0.1, ("n5", "n6"): None, ("n6", "n5"): 15.0, ("n7", "n8"): 0.05, ("n1", "n7"): 0.2}
    assert bench.by_kind(times, ROUTERS) == {
        "public<->public": [0.1], "public<->NAT": [0.2], "NAT<->NAT": [None, 15.0], "same NAT": [0.05]}


PING = """PING 100.96.0.1 (100.96.0.1) 56(84) bytes of data.
[1700000000.100000] 64 bytes from 100.96.0.1: icmp_seq=1 ttl=64 time=0.4 ms
[1700000000.300000] no answer yet for icmp_seq=2
[1700000005.200000] 64 bytes from 100.96.0.1: icmp_seq=51 ttl=64 time=0.5 ms
"""


@pytest.mark.parametrize(
    ("text", "after", "stamp"),
    [
        (PING, 0.0, 1700000000.1),
        (PING, 1700000000.2, 1700000005.2),  # "no answer yet" lines are not replies
        (PING, 1700000005.2, 1700000005.2),  # at `after` counts
        (PING, 1700000006.0, None),
        ("PING 100.96.0.1 (100.96.0.1) 56(84) bytes of data.\n", 0.0, None),
        ("ping: connect: Network is unreachable\n", 0.0, None),
    ],
)
def test_first_reply_after(text, after, stamp):
    assert bench.first_reply(text, after=after) == stamp


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([3.0], 0.5, 3.0),
        ([1.0, 2.0, 3.0], 0.5, 2.0),
        ([1.0, 2.0, 3.0], 0.95, 3.0),  # with 3 runs p95 is the largest
        ([4.0, 1.0, 3.0, 2.0], 0.5, 2.0),  # nearest rank: the lower middle
        ([float(i) for i in range(1, 21)], 0.95, 19.0),
        ([float(i) for i in range(1, 101)], 0.95, 95.0),
    ],
)
def test_nearest_rank_percentile(values, q, expected):
    assert bench.percentile(values, q) == expected


@pytest.mark.parametrize(
    ("values", "summary", "cells"),
    [
        ([1.0, None, 3.0, 2.0], bench.Summary(3, 2.0, 3.0, 3.0, 1), "2.00 / 3.00 / 3.00 (3, 1 never)"),
        ([0.5], bench.Summary(1, 0.5, 0.5, 0.5, 0), "0.50 / 0.50 / 0.50 (1)"),
        ([None, None], bench.Summary(0, None, None, None, 2), "- / - / - (0 of 2)"),
    ],
)
def test_summaries_count_what_never_answered(values, summary, cells):
    assert bench.summarize(values) == summary
    assert summary.cells() == cells


def test_since_subtracts_one_start_or_each_pairs_own():
    stamps = {("n1", "n2"): 12.5, ("n2", "n1"): None}
    assert bench.since(stamps, 10.0) == {("n1", "n2"): 2.5, ("n2", "n1"): None}
    assert bench.since(stamps, {("n1", "n2"): 12.0, ("n2", "n1"): 11.0}) == {("n1", "n2"): 0.5, ("n2", "n1"): None}


@pytest.mark.parametrize(
    ("src", "dst", "moved", "label"),
    [
        ("n5", "n1", "n5", "it -> public"),
        ("n1", "n5", "n5", "public -> it"),
        ("n5", "n7", "n5", "it -> NAT"),
        ("n8", "n7", "n7", "same NAT -> it"),
        ("n2", "n6", "n2", "it -> NAT"),
    ],
)
def test_directions_around_the_node_that_moved(src, dst, moved, label):
    assert bench.kind_of_direction(src, dst, moved, ROUTERS) == label


@pytest.mark.parametrize(
    ("nodes", "sleeper", "nat_roam_peers", "public_roam_peers"),
    [
        (8, "n8", ["n1", "n6", "n7"], ["n1", "n6"]),  # the sleeper is none of the roams' peers
        (6, "n6", ["n1", "n5"], ["n1", "n4"]),
        (4, "n4", ["n1", "n4"], ["n1", "n4"]),
    ],
)
def test_who_sleeps_and_who_watches_the_roams(nodes, sleeper, nat_roam_peers, public_roam_peers):
    topo = bench.topology(nodes)
    assert topo.sleeper == sleeper
    assert topo.roam_peers() == (nat_roam_peers, public_roam_peers)


def test_a_saved_run_reads_back_as_it_was_written():
    run = bench.RunResult(reach={("n1", "n5"): 0.05, ("n5", "n6"): None}, values={"lab.up (s)": 12.3456},
                          sleep={("n8", "n1"): 0.5}, roam_nat={("n5", "n1"): 15.1}, roam_public={}, notes=["x"])
    again = bench.RunResult.from_json(run.as_json())
    assert again.reach == run.reach and again.sleep == run.sleep and again.roam_nat == run.roam_nat
    assert again.values == {"lab.up (s)": 12.346} and again.notes == ["x"]
