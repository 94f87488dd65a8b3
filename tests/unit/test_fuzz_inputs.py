"""Fuzzing every MQTT input of the registrar and the agents (tests/fuzzing.py has the inputs and the properties).

A bounded, derandomized run: the same examples every time, so a CI failure reproduces anywhere. The large run
is bench/bench_fuzz.py (over 100,000 inputs).
"""

from __future__ import annotations

import pytest
from fuzzing import (
    TARGETS,
    AgentHarness,
    Target,
    baseline,
    check_agent_input,
    check_registrar_input,
    check_state_invariants,
    genuine,
)
from hypothesis import HealthCheck, given, settings

from meshcontract import messages
from meshcontract.signing import SIG_FIELD
from meshcontract.topics import Kind

# Modest: the whole file stays well under a minute on a loaded 2-core machine.
CI = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_fuzz(target: Target) -> None:
    """Never raises, refused input changes nothing, the invariants hold (see each check in tests/fuzzing.py)."""
    examples = round(CI.max_examples / target.inputs_per_example)  # about as many inputs for every target
    settings(CI, max_examples=examples)(given(target.inputs)(target.check))()


def test_the_baseline_has_what_the_properties_need() -> None:
    state = baseline()
    check_state_invariants(state)
    members = state.membership.members
    assert sorted(members) == ["n1", "n2", "n3"] and state.revoked and state.membership.ipam.quarantine
    assert {m.state.value for m in members.values()} == {"active", "unreachable"}


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("meshvpn/v1/lab/register/n1", b"[" * 100_000),
        ("meshvpn/v1/lab/heartbeat/n2", b'{"node_id":"n2","epoch":2,"seq":1,"sent_at":NaN}'),
        ("meshvpn/v1/lab/status/n1", b'{"node_id":"n1","state":"offline","epoch":1e999,"at":1}'),
        ("meshvpn/v1/lab/register/n1", b'{"request_id":"\\ud800\\ud800\\ud800\\ud800","node_id":"n1"}'),
        ("meshvpn/v1/lab/register/n1\x00", b"{}"),
        ("meshvpn/v1/lab/register/+", b"{}"),
    ],
)
def test_examples_the_fuzzer_covers(topic: str, payload: bytes) -> None:
    check_registrar_input(baseline(), topic, payload)


def test_a_forgery_is_told_from_the_genuine_article() -> None:
    """The agent check's ground truth: a genuine snapshot changes the agent, the same with one byte of its
    signature changed does not."""
    from fuzzing import SIGNER, start_snapshot

    snap = start_snapshot().model_copy(update={"revision": 6})
    topic = "meshvpn/v1/lab/snapshot"
    sig = SIGNER.sign(snap, kind=Kind.SNAPSHOT, mesh="lab")
    real = messages.encode(snap.model_copy(update={SIG_FIELD: sig}))
    forged = messages.encode(snap.model_copy(update={SIG_FIELD: ("B" if sig[0] == "A" else "A") + sig[1:]}))
    assert genuine(topic, real) and not genuine(topic, forged)
    harness = AgentHarness.create(in_sync=True)
    check_agent_input(harness, topic, forged, True)
    check_agent_input(harness, topic, real, True)
    assert harness.mesh.current().revision == 6
