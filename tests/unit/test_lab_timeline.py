"""Timeline and table formatting for the demo and `meshlab status`."""

import pytest

from meshlab.report import NodeRow, RouterRow, format_matrix, format_status
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


def test_status_table_shows_the_nat_router_of_each_node():
    rows = [NodeRow("n1", "running", "100.96.0.1", underlay_ip="10.77.1.11"),
            NodeRow("n2", "running", "100.96.0.2", underlay_ip="192.168.1.12", router="r1", router_ip="10.77.1.211")]
    routers = [RouterRow("r1", "10.77.1.211", "192.168.1.0/24", group="home", nodes=("n2",))]
    lines = format_status(rows, services={"registrar": "running"}, routers=routers).splitlines()
    assert lines[1].split()[:6] == ["node", "agent", "mesh", "ip", "underlay", "nat"]
    assert lines[2].split()[4] == "-" and lines[3].split()[3:5] == ["192.168.1.12", "r1"]
    assert lines[-1] == "router r1 (group home): 192.168.1.0/24 masqueraded to 10.77.1.211; behind it: n2"
    assert rows[1].as_dict()["router"] == "r1" and rows[1].as_dict()["router_ip"] == "10.77.1.211"
    assert routers[0].as_dict()["nodes"] == ["n2"]
