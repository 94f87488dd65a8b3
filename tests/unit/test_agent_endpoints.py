"""Choosing a peer's endpoint among its candidates (nodeagent.endpoints): order, roaming, trials. Table-driven."""

from __future__ import annotations

import pytest

from meshcontract.messages import Endpoint, EndpointKind, MemberRecord, MemberState
from nodeagent.endpoints import (
    FRESH_S,
    MOVED_S,
    TRIAL_S,
    Choice,
    Heard,
    Listed,
    Trial,
    candidates,
    choose,
    hearing,
    host_names,
    ordered,
    plan_endpoints,
    relisted,
    silent_after,
)
from wgctl import keys
from wgctl.model import PeerState

L, P, R = EndpointKind.LOCAL, EndpointKind.PUBLIC, EndpointKind.REFLEXIVE
KEY = keys.public_key(keys.generate_private_key())
NOW = 10_000.0


def ep(host: str, kind: EndpointKind, port: int = 51820) -> Endpoint:
    return Endpoint(host=host, port=port, kind=kind)


@pytest.mark.parametrize(
    ("endpoints", "own_reflexive", "expected"),
    [
        pytest.param(
            [ep("192.168.1.5", L), ep("203.0.113.9", R), ep("vpn.example.org", P)], None,
            ["vpn.example.org", "203.0.113.9", "192.168.1.5"], id="public, reflexive, local",
        ),
        pytest.param(
            [ep("192.168.1.5", L), ep("203.0.113.9", R), ep("10.0.0.5", L)], "198.51.100.1",
            ["203.0.113.9", "192.168.1.5", "10.0.0.5"], id="another NAT: reflexive before local, order kept",
        ),
        pytest.param(
            [ep("203.0.113.9", R), ep("192.168.1.5", L), ep("vpn.example.org", P)], "203.0.113.9",
            ["192.168.1.5", "vpn.example.org", "203.0.113.9"], id="behind our NAT: the LAN path first",
        ),
        pytest.param(
            [ep("2001:db8::9", R), ep("fd00::5", L)], "2001:db8:0::9", ["fd00::5", "2001:db8::9"],
            id="same reflexive address, written differently",
        ),
    ],
)  # fmt: skip
def test_ordered(endpoints: list[Endpoint], own_reflexive: str | None, expected: list[str]) -> None:
    assert [e.host for e in ordered(endpoints, own_reflexive=own_reflexive)] == expected


def test_candidates_use_resolved_names_only() -> None:
    endpoints = [ep("VPN.example.org", P, 4500), ep("gone.example.org", P), ep("2001:db8::9", R), ep("192.168.1.5", L)]
    usable, skipped = candidates(endpoints, resolved={"vpn.example.org": "198.51.100.7"}, own_reflexive=None)
    assert usable == ["198.51.100.7:4500", "[2001:db8::9]:51820", "192.168.1.5:51820"]
    assert skipped == ["gone.example.org"]
    same, _ = candidates([ep("198.51.100.7", P), ep("198.51.100.7", L)], resolved={}, own_reflexive=None)
    assert same == ["198.51.100.7:51820"], "one candidate per address"


def state(*, endpoint: str | None = None, handshake_age: float | None = None) -> PeerState:
    at = None if handshake_age is None else NOW - handshake_age
    return PeerState(KEY, ("100.96.0.2/32",), endpoint=endpoint, latest_handshake=at)


A, B, C = "192.0.2.1:51820", "192.0.2.2:51820", "192.0.2.3:51820"


@pytest.mark.parametrize(
    ("usable", "actual", "trial", "expected"),
    [
        pytest.param([A, B], None, None, Choice(A, Trial(A, NOW), NOW + TRIAL_S), id="new peer: first candidate"),
        pytest.param(
            [A, B], state(endpoint="198.51.100.9:40000", handshake_age=5), Trial(A, NOW - 100), Choice(None),
            id="fresh handshake: no opinion, whatever WireGuard learned (roaming, a NAT's port)",
        ),
        pytest.param(
            [A, B], state(endpoint=A, handshake_age=FRESH_S - 1), None, Choice(None), id="still fresh just before 180 s",
        ),
        pytest.param(
            [A, B], state(endpoint=A, handshake_age=FRESH_S), Trial(A, NOW - 1), Choice(A, Trial(A, NOW - 1), NOW - 1 + TRIAL_S),
            id="stale: the candidate on trial keeps its trial period",
        ),
        pytest.param(
            [A, B, C], state(endpoint=A), Trial(A, NOW - TRIAL_S), Choice(B, Trial(B, NOW), NOW + TRIAL_S),
            id="trial over: the next candidate",
        ),
        pytest.param(
            [A, B, C], state(endpoint=C), Trial(C, NOW - TRIAL_S - 50), Choice(A, Trial(A, NOW), NOW + TRIAL_S),
            id="after the last, the first again",
        ),
        pytest.param(
            [A, B, C], state(endpoint=B, handshake_age=FRESH_S + 5), None, Choice(B, Trial(B, NOW), NOW + TRIAL_S),
            id="a handshake went stale: the trial starts on the configured candidate (no needless write)",
        ),
        pytest.param(
            [A, B], state(endpoint="198.51.100.9:40000", handshake_age=FRESH_S + 5), None,
            Choice(A, Trial(A, NOW), NOW + TRIAL_S), id="stale roamed endpoint that is no candidate: the first",
        ),
        pytest.param(
            [A, B], None, Trial("192.0.2.99:1", NOW - 1), Choice(A, Trial(A, NOW), NOW + TRIAL_S),
            id="the candidate on trial is gone from the record",
        ),
        pytest.param([A], state(endpoint=A), Trial(A, NOW - 99), Choice(A, Trial(A, NOW), None), id="one candidate: no wake-up needed"),
        pytest.param([], state(endpoint=A), None, Choice(None), id="no usable candidate: no opinion"),
    ],
)  # fmt: skip
def test_choose(usable: list[str], actual: PeerState | None, trial: Trial | None, expected: Choice) -> None:
    assert choose(usable, actual=actual, trial=trial, now=NOW) == expected


def test_cycling_through_candidates_over_time() -> None:
    usable, trial, seen = [A, B, C], None, []
    for step in range(8):
        choice = choose(usable, actual=None, trial=trial, now=NOW + step * 5)
        trial = choice.trial
        seen.append(choice.endpoint)
    # each candidate for 12-15 s (passes every 5 s here), in order, then again
    assert seen == [A, A, A, B, B, B, C, C]


def record(node: str, *endpoints: Endpoint, key: str | None = None) -> MemberRecord:
    return MemberRecord(
        node_id=node, name=node, mesh_ip="100.96.0.9", public_key=key or keys.public_key(keys.generate_private_key()),
        endpoints=list(endpoints), listen_port=51820, state=MemberState.ACTIVE, revision=1, updated_at=1.0,
    )  # fmt: skip


def test_plan_endpoints_per_peer() -> None:
    named = record("named", ep("vpn.example.org", P))
    dead = record("dead", ep("gone.example.org", P))
    pending = record("pending", ep("slow.example.org", P))
    multi = record("multi", ep("203.0.113.9", R), ep("192.168.1.5", L))
    bare = record("bare")
    plan = plan_endpoints(
        [named, dead, pending, multi, bare], actual={}, trials={},
        resolved={"vpn.example.org": "198.51.100.7"}, failed={"gone.example.org"}, own_reflexive=None, now=NOW,
    )  # fmt: skip
    assert plan.endpoints == {
        named.public_key: "198.51.100.7:51820",
        dead.public_key: None,
        pending.public_key: None,
        multi.public_key: "203.0.113.9:51820",
        bare.public_key: None,
    }
    assert plan.unusable == {dead.public_key: ("gone.example.org",)}, "pending lookups are no problem (yet)"
    assert set(plan.trials) == {named.public_key, multi.public_key}
    assert plan.next_at == NOW + TRIAL_S, "only the peer with a second candidate needs a pass when its trial ends"
    assert host_names([named, dead, multi, bare]) == {"vpn.example.org", "gone.example.org"}


SILENT = silent_after(25)  # 40 s with the mesh's 25 s keepalive


@pytest.mark.parametrize(
    ("actual", "heard", "expected"),
    [
        pytest.param(state(endpoint="198.51.100.9:40000", handshake_age=60), Heard(500, NOW - 10), Choice(None),
                     id="fresh handshake, heard 10 s ago: keep the roamed endpoint"),
        pytest.param(state(endpoint="198.51.100.9:40000", handshake_age=60), Heard(500, NOW - SILENT - 1),
                     Choice(A, Trial(A, NOW), NOW + TRIAL_S),
                     id="fresh handshake but silent past the keepalive: the peer moved, try the candidates"),
        pytest.param(state(endpoint=B, handshake_age=60), Heard(500, NOW - SILENT - 1),
                     Choice(B, Trial(B, NOW), NOW + TRIAL_S),
                     id="silent on a candidate: its trial starts there (no needless write)"),
        pytest.param(state(endpoint="198.51.100.9:40000", handshake_age=60), None, Choice(None),
                     id="never measured: no opinion yet"),
    ],
)  # fmt: skip
def test_a_silent_tunnel_is_not_fresh(actual: PeerState, heard: Heard | None, expected: Choice) -> None:
    assert choose([A, B], actual=actual, trial=None, now=NOW, heard=heard, silent_s=SILENT) == expected


@pytest.mark.parametrize(
    ("keepalive", "expected"), [(25, 40.0), (10, 25.0), (0, None)],
)  # fmt: skip
def test_silence_needs_persistent_keepalive(keepalive: int, expected: float | None) -> None:
    assert silent_after(keepalive) == expected


def test_hearing_restarts_only_when_bytes_arrive() -> None:
    peer = PeerState(KEY, ("100.96.0.2/32",), rx_bytes=100)
    first = hearing({}, {KEY: peer}, now=NOW)
    assert first == {KEY: Heard(100, NOW)}
    same = hearing(first, {KEY: peer}, now=NOW + 30)
    assert same == first, "a counter standing still keeps its time"
    moved = hearing(same, {KEY: PeerState(KEY, ("100.96.0.2/32",), rx_bytes=132)}, now=NOW + 31)
    assert moved == {KEY: Heard(132, NOW + 31)}
    assert hearing(moved, {}, now=NOW + 32) == {}, "a peer gone from the interface is forgotten"


@pytest.mark.parametrize(
    ("usable", "trial", "changed_at", "expected"),
    [
        pytest.param([B, A], Trial(A, NOW - 1), NOW, Choice(B, Trial(B, NOW), NOW + TRIAL_S),
                     id="a better candidate arrived (the reflexive address after enrollment): start over from it"),
        pytest.param([A, B], Trial(A, NOW - 1), NOW, Choice(A, Trial(A, NOW), NOW + TRIAL_S),
                     id="a worse one arrived: start over, the first is still the one on trial"),
        pytest.param([A, B], Trial(A, NOW - 1), NOW - 5, Choice(A, Trial(A, NOW - 1), NOW - 1 + TRIAL_S),
                     id="candidates that changed before the trial began: the trial runs on"),
        pytest.param([B, A], Trial(A, NOW - 1), None, Choice(A, Trial(A, NOW - 1), NOW - 1 + TRIAL_S),
                     id="unchanged candidates: the trial runs on"),
    ],
)  # fmt: skip
def test_changed_candidates_restart_the_cycle(
    usable: list[str], trial: Trial, changed_at: float | None, expected: Choice
) -> None:
    assert choose(usable, actual=None, trial=trial, now=NOW, changed_at=changed_at) == expected


@pytest.mark.parametrize(
    ("heard", "changed_at", "expected"),
    [
        pytest.param(Heard(500, NOW - 20), NOW - MOVED_S, Choice(A, Trial(A, NOW), NOW + TRIAL_S),
                     id="its record changed 5 s ago and nothing was heard since: try the new candidates"),
        pytest.param(Heard(500, NOW - 20), NOW - 2, Choice(None),
                     id="changed 2 s ago: give its own packets a moment first"),
        pytest.param(Heard(600, NOW - 3), NOW - 10, Choice(None),
                     id="heard from it after the change: the tunnel works"),
        pytest.param(Heard(500, NOW - 20), None, Choice(None), id="unchanged since first seen, heard 20 s ago"),
    ],
)  # fmt: skip
def test_a_peer_whose_record_changed_and_went_quiet_is_tried_on_its_new_candidates(
    heard: Heard, changed_at: float | None, expected: Choice
) -> None:
    actual = state(endpoint="198.51.100.9:40000", handshake_age=30)
    got = choose([A, B], actual=actual, trial=None, now=NOW, heard=heard, silent_s=SILENT, changed_at=changed_at)
    assert got == expected


def test_relisted_marks_only_real_changes() -> None:
    first = relisted(None, [A, B], now=NOW)
    assert first == Listed((A, B)), "first seen is no change"
    assert relisted(first, [A, B], now=NOW + 5) is first
    moved = relisted(first, [C, A], now=NOW + 9)
    assert moved == Listed((C, A), NOW + 9)
    assert relisted(moved, [C, A], now=NOW + 20) is moved, "the time of the change stays"
