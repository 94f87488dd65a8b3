"""Which member `meshctl ping TARGET` means (nodeagent.status.resolve_target): never a guess."""

from __future__ import annotations

import base64

import pytest

from meshcontract.messages import MemberRecord, MemberState
from nodeagent.errors import AgentError
from nodeagent.status import resolve_target


def record(node_id: str, name: str, ip: str) -> MemberRecord:
    key = base64.b64encode(node_id.encode().ljust(32, b"x")).decode()
    return MemberRecord(node_id=node_id, name=name, mesh_ip=ip, public_key=key, listen_port=51820,
                        state=MemberState.ACTIVE, revision=1, updated_at=1.0)  # fmt: skip


RECORDS = [record("n2", "beta", "100.96.0.2"), record("n3", "beta", "100.96.0.3"), record("n4", "gamma", "100.96.0.4")]


@pytest.mark.parametrize(
    ("target", "node"),
    [("gamma", "n4"), ("100.96.0.3", "n3"), ("n2", "n2"), ("n3", "n3")],
)
def test_unique_targets(target, node):
    assert resolve_target(RECORDS, target).node_id == node


def test_a_shared_name_lists_the_candidates():
    with pytest.raises(AgentError, match=r"2 members are named 'beta': n2 \(100.96.0.2\), n3 \(100.96.0.3\)"):
        resolve_target(RECORDS, "beta")


def test_no_such_member():
    with pytest.raises(AgentError, match="no mesh member"):
        resolve_target(RECORDS, "delta")
