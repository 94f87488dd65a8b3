"""Who may run which op on the agent's local socket (meshcontract.localapi.refusal): reads are open to every caller
the socket lets in, a change to the node needs root or the agent's own user."""

from __future__ import annotations

import pytest

from meshcontract.localapi import READ_ONLY_OPS, LocalRequest, refusal

AGENT_UID = 0  # the agent runs as root in production


@pytest.mark.parametrize(
    ("op", "caller_uid", "agent_uid", "allowed"),
    [
        pytest.param("status", 1000, AGENT_UID, True, id="a chat user reads the status"),
        pytest.param("ping", 1000, AGENT_UID, True, id="a chat user pings a peer"),
        pytest.param("status", None, AGENT_UID, True, id="reads need no known uid"),
        pytest.param("rotate-key", 0, AGENT_UID, True, id="root rotates"),
        pytest.param("rotate-key", 1000, AGENT_UID, False, id="a chat user in the socket's group may not rotate"),
        pytest.param("rotate-key", 65534, AGENT_UID, False, id="nobody may not rotate"),
        pytest.param("rotate-key", None, AGENT_UID, False, id="an unknown caller may not rotate"),
        pytest.param("rotate-key", 990, 990, True, id="the agent's own user rotates (agent not run as root)"),
        pytest.param("rotate-key", 0, 990, True, id="root rotates an agent run as another user"),
        pytest.param("rotate-key", 1000, 990, False, id="another user may not rotate an agent run as a user"),
        pytest.param("some-future-op", 1000, AGENT_UID, False, id="a new op is privileged until listed as a read"),
    ],
)
def test_refusal(op: str, caller_uid: int | None, agent_uid: int, allowed: bool) -> None:
    reason = refusal(op, caller_uid=caller_uid, agent_uid=agent_uid)
    assert (reason is None) == allowed, reason
    if not allowed:
        assert op in reason and f"uid {agent_uid}" in reason


def test_every_op_is_either_a_read_or_privileged() -> None:
    ops = set(LocalRequest.model_fields["op"].annotation.__args__)
    assert READ_ONLY_OPS < ops, "a read-only op the contract does not know"
    assert ops - READ_ONLY_OPS == {"rotate-key"}, "a new op: decide whether it only reads, then update this test"
