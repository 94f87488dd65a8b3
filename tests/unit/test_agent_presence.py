"""The agent's data-plane presence: the path report and when it is due (nodeagent.presence), table-driven."""

from __future__ import annotations

import pytest

from meshcontract.messages import BrokenPath, PathReport
from nodeagent.presence import REPORT_EVERY_S, SETTLE_S, STALE_HANDSHAKE_S, path_report, report_due
from wgctl.model import PeerState

NOW = 10_000.0


def peer(key: str, handshake: float | None) -> PeerState:
    return PeerState(public_key=key, allowed_ips=("100.96.0.9/32",), latest_handshake=handshake)


@pytest.mark.parametrize(
    ("handshake", "seen_since", "fresh", "broken"),
    [
        (NOW - 5, NOW - 100, 1, []),
        (NOW - STALE_HANDSHAKE_S + 1, NOW - 1000, 1, []),
        (NOW - STALE_HANDSHAKE_S - 10, NOW - 1000, 0, [BrokenPath(node_id="b", handshake_age_s=190.0)]),
        (None, NOW - SETTLE_S, 0, [BrokenPath(node_id="b", handshake_age_s=None)]),
        (None, NOW - SETTLE_S + 1, 0, []),  # a new tunnel gets time for its first handshake
    ],
)
def test_path_report(handshake, seen_since, fresh, broken):
    report = path_report({"kb": peer("kb", handshake)}, node_of={"kb": "b"}, seen_since={"kb": seen_since}, now=NOW)
    assert report == PathReport(fresh=fresh, broken=broken)


def test_path_report_leaves_out_peers_that_are_not_members_and_truncates():
    peers = {f"k{i}": peer(f"k{i}", None) for i in range(300)}
    node_of = {f"k{i}": f"n{i:03d}" for i in range(299)}  # k299 is no member
    report = path_report(peers, node_of=node_of, seen_since=dict.fromkeys(peers, 0.0), now=NOW)
    assert report.truncated and len(report.broken) == 128 and report.broken[0].node_id == "n000"


@pytest.mark.parametrize(
    ("last", "last_at", "new", "due"),
    [
        (None, None, PathReport(fresh=1), True),
        (PathReport(fresh=1), NOW - 5, PathReport(fresh=1), False),
        (PathReport(fresh=1), NOW - REPORT_EVERY_S, PathReport(fresh=1), True),
        (PathReport(fresh=1), NOW - 5, PathReport(fresh=2), True),
        (PathReport(fresh=0, broken=[BrokenPath(node_id="b", handshake_age_s=200.0)]), NOW - 5,
         PathReport(fresh=0, broken=[BrokenPath(node_id="b", handshake_age_s=205.0)]), False),  # only the age moved
    ],
)
def test_report_due(last, last_at, new, due):
    assert report_due(last, new, last_at=last_at, now=NOW) is due
