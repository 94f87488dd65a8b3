"""Judging a mesh from per-node WireGuard views: complete, missing tunnels, ghosts, duplicates."""

import pytest

from meshlab.meshview import NodeTunnels, holders_of, mesh_problems, parse_ping_summary, parse_wg_allowed_ips

A, B, C = "100.96.0.1", "100.96.0.2", "100.96.0.3"


def v(name, ip, *peers):
    return NodeTunnels(name, ip, tuple((p,) if isinstance(p, str) else p for p in peers))


COMPLETE = {"a": v("a", A, B, C), "b": v("b", B, A, C), "c": v("c", C, A, B)}


@pytest.mark.parametrize(
    ("views", "expected", "problems"),
    [
        (COMPLETE, ["a", "b", "c"], []),
        ({"a": v("a", A, B), "b": v("b", B, A)}, ["a", "b"], []),
        ({"a": v("a", A)}, ["a"], []),
        # c left: a and b still hold tunnels to it
        (COMPLETE, ["a", "b"], ["a: ghost tunnel to 100.96.0.3", "b: ghost tunnel to 100.96.0.3"]),
        ({**COMPLETE, "c": v("c", C, A)}, ["a", "b", "c"], ["c: no tunnel to 100.96.0.2"]),
        ({**COMPLETE, "c": v("c", None)}, ["a", "b", "c"],
         ["c: no mesh IP known", "a: ghost tunnel to 100.96.0.3", "b: ghost tunnel to 100.96.0.3"]),
        ({"a": v("a", A, B), "b": v("b", A, A)}, ["a", "b"],
         ["mesh IP 100.96.0.1 held by a, b", "a: no tunnel to 100.96.0.1", "a: ghost tunnel to 100.96.0.2"]),
        ({"a": v("a", A, B), "b": v("b", B, A, A)}, ["a", "b"], ["b: 2 peers for 1 members"]),
        # a restarted node left a stale peer: the same IP moved to the new key, the old peer kept nothing
        ({"a": v("a", A, B, ()), "b": v("b", B, A)}, ["a", "b"],
         ["a: 1 peer(s) without allowed IPs (duplicate key for one IP?)"]),
        ({}, ["a"], ["a: no mesh IP known"]),
    ],
)
def test_mesh_problems(views, expected, problems):
    assert mesh_problems(views, expected) == problems


def test_holders_of():
    assert holders_of(COMPLETE, C, among=["a", "b"]) == ["a", "b"]
    assert holders_of({"a": v("a", A, B)}, C, among=["a"]) == []


@pytest.mark.parametrize(
    ("text", "peers"),
    [
        ("", ()),
        ("KEY1=\t100.96.0.2/32\n", (("100.96.0.2",),)),
        ("K1=\t100.96.0.2/32\nK2=\t(none)\n", (("100.96.0.2",), ())),
        ("K1=\t100.96.0.2/32 10.0.0.0/8\n", (("100.96.0.2", "10.0.0.0/8"),)),
    ],
)
def test_parse_wg_allowed_ips(text, peers):
    assert parse_wg_allowed_ips(text) == peers


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("--- 1.2.3.4 ping statistics ---\n25 packets transmitted, 25 received, 0% packet loss, time 4800ms\n",
         (25, 25)),
        ("7 packets transmitted, 5 received, +2 errors, 28.5714% packet loss, time 1205ms\n", (7, 5)),
        ("PING 1.2.3.4\n", (0, 0)),
        # the last probe was in flight when ping was interrupted: not a loss
        ("64 bytes from 1.2.3.4: icmp_seq=1 ttl=64 time=0.3 ms\n64 bytes from 1.2.3.4: icmp_seq=2 ttl=64 time=0.3 ms\n"
         "3 packets transmitted, 2 received, 33.3333% packet loss, time 250ms\n", (2, 2)),
        # ...but a gap before the end is
        ("64 bytes from 1.2.3.4: icmp_seq=1 ttl=64 time=0.3 ms\n64 bytes from 1.2.3.4: icmp_seq=3 ttl=64 time=0.3 ms\n"
         "4 packets transmitted, 2 received, 50% packet loss, time 350ms\n", (4, 2)),
    ],
)
def test_parse_ping_summary(text, result):
    assert parse_ping_summary(text) == result


PING_LOG = """PING 100.96.0.2 (100.96.0.2) 56(84) bytes of data.
[100.0] 64 bytes from 100.96.0.2: icmp_seq=1 ttl=64 time=0.5 ms
[100.4] no answer yet for icmp_seq=2
[100.6] no answer yet for icmp_seq=3
[100.7] 64 bytes from 100.96.0.2: icmp_seq=2 ttl=64 time=500 ms
[100.8] 64 bytes from 100.96.0.2: icmp_seq=4 ttl=64 time=0.5 ms
[103.0] no answer yet for icmp_seq=5
"""


@pytest.mark.parametrize(
    ("now", "reported", "expected"),
    [
        (110.0, set(), [(3, 100.6), (5, 103.0)]),  # 2 was answered late: not lost
        (104.0, set(), [(3, 100.6)]),  # 5 may still be answered
        (110.0, {3}, [(5, 103.0)]),
    ],
)
def test_ping_losses(now, reported, expected):
    from meshlab.meshview import new_losses, probes_sent

    assert new_losses(PING_LOG, now=now, reported=reported, grace_s=2.0) == expected
    assert probes_sent(PING_LOG) == 5


def test_a_tolerated_node_may_be_held_or_not():
    """A killed agent's node (its WireGuard still answers) may stay a peer of the others (control_lost)."""
    a = NodeTunnels("n1", "100.96.0.1", (("100.96.0.2",), ("100.96.0.3",)))
    b = NodeTunnels("n2", "100.96.0.2", (("100.96.0.1",),))
    killed = NodeTunnels("n3", "100.96.0.3", (("100.96.0.1",), ("100.96.0.2",)))
    views = {"n1": a, "n2": b, "n3": killed}
    assert mesh_problems(views, ["n1", "n2"], tolerated=["n3"]) == []
    assert mesh_problems(views, ["n1", "n2"]) == ["n1: ghost tunnel to 100.96.0.3"]
