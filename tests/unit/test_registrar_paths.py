"""Per-pair reachability from path reports (registrar.paths), table-driven."""

from __future__ import annotations

from dataclasses import replace

from test_registrar_membership import empty, reg

from meshcontract.messages import BrokenPath, MemberState, PathReport
from registrar import paths


def mesh(*nodes: str):
    state = empty()
    for i, node in enumerate(nodes, start=1):
        state = reg(state, node, i, now=1.0).state
    return state


def test_broken_pairs_from_current_reports_only():
    ms = mesh("a", "b", "c")
    table = paths.update(paths.EMPTY, node_id="a", epoch=1, report=PathReport(
        fresh=1, broken=[BrokenPath(node_id="b", handshake_age_s=None), BrokenPath(node_id="gone", handshake_age_s=1)]
    ), now=5.0)  # fmt: skip
    table = paths.update(table, node_id="c", epoch=0, report=PathReport(
        fresh=0, broken=[BrokenPath(node_id="a", handshake_age_s=200.0)]), now=5.0)  # an older session: stale
    pairs = paths.broken_pairs(table, ms)
    assert [(p.source, p.target, p.handshake_age_s, p.both_active) for p in pairs] == [("a", "b", None, True)]
    assert paths.summary(table, ms) == {
        "paths_reporting": 1.0, "paths_fresh": 1.0, "paths_broken": 1.0, "paths_broken_both_active": 1.0,
    }  # fmt: skip


def test_a_report_from_a_member_that_is_no_longer_active_does_not_count():
    ms = mesh("a", "b")
    table = paths.update(paths.EMPTY, node_id="a", epoch=1,
                         report=PathReport(fresh=0, broken=[BrokenPath(node_id="b", handshake_age_s=None)]), now=5.0)
    members = dict(ms.members)
    members["a"] = replace(members["a"], state=MemberState.UNREACHABLE)
    assert paths.broken_pairs(table, replace(ms, members=members)) == []
    members = dict(ms.members)
    members["b"] = replace(members["b"], state=MemberState.CONTROL_LOST)
    (pair,) = paths.broken_pairs(table, replace(ms, members=members))
    assert not pair.both_active, "b lost the control plane: not a data-plane-only break"
