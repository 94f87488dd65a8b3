"""meshctl: command line, socket choice, why the agent cannot be reached, rendering; ping output parsing (pure)."""

from __future__ import annotations

import errno

import pytest

from meshcontract.localapi import AgentStatus, PeerView, PingResult, RotateResult
from nodeagent.meshctl import (
    explain_unreachable,
    format_age,
    format_bytes,
    parse_args,
    render_ping,
    render_rotated,
    render_status,
    resolve_socket,
)
from nodeagent.ping import parse_ping_output

DEFAULT = "/run/meshvpn/agent.sock"


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["status"], {}, {"command": "status", "socket": DEFAULT, "json": False}),
        (["--socket", "/a.sock", "status"], {}, {"command": "status", "socket": "/a.sock"}),
        (["status", "--socket", "/a.sock", "--json"], {}, {"command": "status", "socket": "/a.sock", "json": True}),
        (["status"], {"MESHVPN_SOCKET": "/lab/n1/agent.sock"}, {"socket": "/lab/n1/agent.sock"}),
        (["status", "--socket", "/flag.sock"], {"MESHVPN_SOCKET": "/env.sock"}, {"socket": "/flag.sock"}),
        (["--socket", "/before.sock", "status", "--socket", "/after.sock"], {}, {"socket": "/after.sock"}),
        (["status"], {"MESHVPN_SOCKET": ""}, {"socket": DEFAULT}),
        (["ping", "beta"], {}, {"command": "ping", "target": "beta", "count": 3, "json": False, "socket": DEFAULT}),
        (["ping", "--json", "beta", "-c", "2", "--socket", "/s"], {},
         {"command": "ping", "target": "beta", "count": 2, "json": True, "socket": "/s"}),
        (["rotate-key"], {}, {"command": "rotate-key", "json": False, "socket": DEFAULT}),
        (["rotate-key", "--json", "--socket", "/s"], {}, {"command": "rotate-key", "json": True, "socket": "/s"}),
    ],
)
def test_parse_args(argv, env, expected):
    args = vars(parse_args(argv, env))
    assert {key: args[key] for key in expected} == expected


@pytest.mark.parametrize("argv", [[], ["status", "--socket"], ["ping"], ["restart"]])
def test_bad_command_lines_exit_2(argv):
    with pytest.raises(SystemExit) as err:
        parse_args(argv, {})
    assert err.value.code == 2


@pytest.mark.parametrize(
    ("flag", "env", "socket"),
    [(None, {}, DEFAULT), (None, {"MESHVPN_SOCKET": "/e"}, "/e"), ("/f", {"MESHVPN_SOCKET": "/e"}, "/f")],
)
def test_resolve_socket(flag, env, socket):
    assert resolve_socket(flag, env) == socket


S = "/run/meshvpn/agent.sock"


@pytest.mark.parametrize(
    ("code", "exists", "says", "never"),
    [
        (errno.EACCES, True, f"permission denied on {S}: run as root or join group meshvpn", "not running"),
        (errno.EPERM, True, f"permission denied on {S}: run as root or join group meshvpn", "not running"),
        # A directory we may not search hides the socket: still a permission problem, not a missing agent.
        (errno.EACCES, False, f"permission denied on {S}", "not running"),
        (errno.ENOENT, False, f"the agent is not running at {S} (no socket there)", "permission"),
        (errno.ECONNREFUSED, True, f"the agent is not running at {S} (a socket is there but nobody answers)",
         "permission"),
        (errno.ECONNREFUSED, False, f"the agent is not running at {S} (no socket there)", "permission"),
        (errno.ENOTSOCK, True, f"cannot reach the agent at {S}: Socket operation on non-socket", "running"),
    ],
)
def test_explain_unreachable(code, exists, says, never):
    text = explain_unreachable(S, OSError(code, "x"), exists=exists)
    assert text.startswith(says), text
    assert never not in text
    if "not running" in text:
        assert "--socket" in text and "MESHVPN_SOCKET" in text, "say how to point at another agent"


def test_explain_timeout():
    assert explain_unreachable(S, TimeoutError("timed out"), exists=True) == (
        f"cannot reach the agent at {S}: timed out"
    )


@pytest.mark.parametrize(
    ("then", "now", "text"),
    [
        (None, 100.0, "never"),
        (0.0, 100.0, "never"),
        (88.0, 100.0, "12s ago"),
        (100.0, 400.0, "5m ago"),
        (0.5, 10801.0, "3h ago"),
        (1.0, 1.0 + 3 * 86400, "3d ago"),
        (105.0, 100.0, "0s ago"),
    ],
)
def test_format_age(then: float | None, now: float, text: str) -> None:
    assert format_age(then, now=now) == text


@pytest.mark.parametrize(
    ("count", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (12 * 1024**2, "12.0 MiB")]
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


def _status(peers: list[PeerView], **kw: object) -> AgentStatus:
    base = dict(
        node_id="n1",
        name="alpha",
        mesh_ip="100.96.0.1",
        prefix_len=16,
        interface="meshvpn0",
        broker_connected=True,
        registrar_online=True,
        membership_revision=7,
        membership_complete=True,
        peers=peers,
        now=1000.0,
    )
    base.update(kw)
    return AgentStatus(**base)


def test_render_status_table() -> None:
    peers = [
        PeerView(
            node_id="n2",
            name="beta",
            mesh_ip="100.96.0.2",
            public_key="k2",
            state="active",
            configured=True,
            endpoint="192.0.2.2:51820",
            latest_handshake=988.0,
            rx_bytes=2048,
            tx_bytes=10,
        ),
        PeerView(
            node_id="n3",
            name="gamma",
            mesh_ip="100.96.0.3",
            public_key="k3",
            state="unreachable",
            configured=False,
        ),
    ]
    text = render_status(_status(peers))
    lines = text.splitlines()
    assert "alpha (n1)" in lines[0] and "100.96.0.1/16 on meshvpn0" in lines[1]
    assert "registrar  online" in lines[3] and lines[4] == "membership revision 7, complete"
    assert "roster" not in text, "the signed membership is no roster"
    header = next(line for line in lines if line.startswith("NAME"))
    assert header.split() == ["NAME", "MESH", "IP", "STATE", "HANDSHAKE", "ENDPOINT", "RX", "TX"]
    beta = next(line for line in lines if line.startswith("beta"))
    assert beta.split() == [
        "beta",
        "100.96.0.2",
        "active",
        "12s",
        "ago",
        "192.0.2.2:51820",
        "2.0",
        "KiB",
        "10",
        "B",
    ]
    gamma = next(line for line in lines if line.startswith("gamma"))
    assert "unreachable" in gamma and "-" in gamma


def test_render_status_control_plane_down() -> None:
    text = render_status(
        _status(
            [],
            broker_connected=False,
            registrar_online=False,
            membership_complete=False,
            mesh_ip=None,
            prefix_len=None,
        )
    )
    assert "DISCONNECTED" in text and "OFFLINE" in text and "INCOMPLETE" in text and "not registered" in text
    assert text.endswith("no peers")


def test_render_ping() -> None:
    text = render_ping(PingResult(target="beta", mesh_ip="100.96.0.2", rtts_ms=[1.0, None, 3.0]))
    assert "seq=2 timeout" in text
    assert "3 sent, 2 received, 33% loss, rtt min/avg/max 1.00/2.00/3.00 ms" in text


IPUTILS = """PING 100.96.0.2 (100.96.0.2) 56(84) bytes of data.
64 bytes from 100.96.0.2: icmp_seq=1 ttl=64 time=0.086 ms
64 bytes from 100.96.0.2: icmp_seq=3 ttl=64 time=1.50 ms

--- 100.96.0.2 ping statistics ---
3 packets transmitted, 2 received, 33% packet loss, time 404ms
"""
BUSYBOX = """PING 100.96.0.2 (100.96.0.2): 56 data bytes
64 bytes from 100.96.0.2: seq=0 ttl=64 time=0.101 ms
64 bytes from 100.96.0.2: seq=1 ttl=64 time=0.202 ms
"""
DUP = """64 bytes from 100.96.0.2: icmp_seq=1 ttl=64 time=0.5 ms
64 bytes from 100.96.0.2: icmp_seq=1 ttl=64 time=0.9 ms (DUP!)
"""


@pytest.mark.parametrize(
    ("text", "count", "rtts"),
    [
        (IPUTILS, 3, [0.086, None, 1.5]),
        (BUSYBOX, 2, [0.101, 0.202]),
        (DUP, 1, [0.5]),
        ("", 2, [None, None]),
        ("From 100.96.0.1 icmp_seq=1 Destination Host Unreachable", 1, [None]),
    ],
)
def test_parse_ping_output(text: str, count: int, rtts: list[float | None]) -> None:
    assert parse_ping_output(text, count=count) == rtts


@pytest.mark.parametrize(
    ("confirmed", "mesh_ip", "says", "never"),
    [
        (True, "10.0.0.7", ["new public key  NEW=", "old public key  OLD=", "10.0.0.7 (unchanged)"], "did not confirm"),
        (False, "10.0.0.7", ["registrar did not confirm", "next connection"], "nothing"),
        (True, None, ["(not registered yet)"], "did not confirm"),
    ],
)
def test_render_rotated(confirmed, mesh_ip, says, never):
    text = render_rotated(
        RotateResult(previous_public_key="OLD=", public_key="NEW=", mesh_ip=mesh_ip, confirmed=confirmed)
    )
    assert all(s in text for s in says) and never not in text
