"""Registration replies over MQTT must be the registrar's: signed, for this mesh (nodeagent.inbound)."""

from __future__ import annotations

import pytest

from meshcontract import messages
from meshcontract.errors import ContractError
from meshcontract.messages import RegisterReply
from meshcontract.signing import Signer, Verifier
from nodeagent.inbound import verified_reply

REGISTRAR = Signer.generate()
REPLY = RegisterReply(request_id="r1234567", ok=True, node_id="n1", mesh_ip="100.96.0.7", prefix_len=16)


def sign(reply: RegisterReply, signer: Signer = REGISTRAR, *, kind: str = "reply", mesh: str = "m1") -> bytes:
    return messages.encode(reply.model_copy(update={"sig": signer.sign(reply, kind=kind, mesh=mesh)}))


def test_a_signed_reply_is_accepted():
    assert verified_reply(sign(REPLY), Verifier(REGISTRAR.public_key), mesh="m1").mesh_ip == "100.96.0.7"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(messages.encode(REPLY), id="unsigned"),
        pytest.param(sign(REPLY, Signer.generate()), id="another key"),
        pytest.param(sign(REPLY, mesh="m2"), id="another mesh"),
        pytest.param(sign(REPLY, kind="snapshot"), id="a signature for another kind"),
        pytest.param(sign(REPLY).replace(b"100.96.0.7", b"100.96.0.9"), id="altered after signing"),
        pytest.param(sign(REPLY)[:-5], id="truncated"),
    ],
)
def test_anything_else_is_refused(payload):
    with pytest.raises(ContractError):
        verified_reply(payload, Verifier(REGISTRAR.public_key), mesh="m1")
