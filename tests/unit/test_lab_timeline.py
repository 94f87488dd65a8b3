"""Timeline and table formatting for the demo and `meshlab status`."""

import pytest

from meshlab.report import NodeRow, format_matrix, format_status
from meshlab.timeline import Timeline, format_duration, format_event


@pytest.mark.parametrize(
    ("elapsed", "text", "kind", "line"),
    [
        (0.0, "start", "", "+   0.000s  start"),
        (12.3456, "n3 crashed", "fault", "+  12.346s  [fault] n3 crashed"),
        (1234.5, "x", "", "+1234.500s  x"),
    ],
)
def test_format_event(elapsed, text, kind, line):
    assert format_event(elapsed, text, kind=kind) == line


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250 ms"), (3.21, "3.2 s"), (125, "2 min 05 s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_timeline_is_relative_to_start():
    tl = Timeline(start=100.0)
    assert tl.record(101.5, "a") == "+   1.500s  a"
    tl.record(99.0, "clock skew clamps to zero", kind="x")
    assert tl.lines() == ["+   1.500s  a", "+   0.000s  [x] clock skew clamps to zero"]


def test_matrix():
    out = format_matrix(["n1", "n2"], {("n1", "n2"): True, ("n2", "n1"): False})
    assert out.splitlines() == ["      n1  n2", "n1     -  ok", "n2  FAIL   -"]


def test_status_table_marks_partitions_and_handshakes():
    rows = [NodeRow("n1", "running", "100.96.0.1", underlay_ip="10.77.1.11", peers_configured=1, peers_known=1,
                    handshakes={"n2": 3.2}),
            NodeRow("n2", "frozen", "100.96.0.2", underlay_ip="10.77.1.12", partitioned=True)]
    out = format_status(rows, services={"registrar": "running"})
    assert "registrar=running" in out
    assert "n2:3s" in out
    assert "frozen*" in out and "partitioned" in out
