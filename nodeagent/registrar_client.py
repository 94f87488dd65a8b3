"""The agent's HTTPS door to the registrar after enrollment: what must not go through the broker.

Authenticated with the node's own credential (HTTP Basic, node id + its broker password) over TLS verified
against the mesh's CA (saved at enrollment), so a broker — which could publish as any node — can neither
register a new key for a node nor fake the registrar's answer:
  - `register`: a RegisterRequest that may carry a new WireGuard key (rotation, or finishing one a crash
    interrupted); the registrar refuses key changes that come through the broker (rekey_over_https).
  - `identity_valid`: does the registrar still know this node by its credential? Asked when the broker refuses
    our login, to tell "removed, revoked or expired" (stop, exit 4) from a broker problem (keep retrying).
"""

from __future__ import annotations

import base64

from meshcontract.errors import ContractError
from meshcontract.messages import RegisterReply, RegisterRequest, decode
from nodeagent.enrollment import TransientError, _request, _Url


class RegistrarClient:
    """HTTPS calls to the registrar at `url` as node `node_id` (TransientError when it cannot be asked)."""

    def __init__(self, url: str, *, ca_pem: str, node_id: str, password: str) -> None:
        self._url = _Url.parse(url)
        self._ca_pem = ca_pem
        self._node_id = node_id
        self._auth = "Basic " + base64.b64encode(f"{node_id}:{password}".encode()).decode()

    def register(self, request: RegisterRequest) -> RegisterReply:
        """POST /v1/register: the registrar's answer (ok or refused); TransientError if there is none."""
        status, data = _request(
            self._url, "POST", "/v1/register", request.model_dump_json().encode(), self._ca_pem,
            headers={"Authorization": self._auth},
        )  # fmt: skip
        if status >= 500:
            raise TransientError(f"registrar answered {status} to /v1/register")
        try:
            return decode(RegisterReply, data)
        except ContractError as exc:
            raise TransientError(f"registrar answered {status} to /v1/register unreadably: {exc}") from exc

    def identity_valid(self) -> bool:
        """True if the registrar accepts our credential, False if it refuses it (401/403/404: we are no member).
        TransientError if it cannot be asked."""
        status, _ = _request(
            self._url, "GET", f"/v1/nodes/{self._node_id}", None, self._ca_pem, headers={"Authorization": self._auth}
        )
        if status in (401, 403, 404):
            return False
        if status != 200:
            raise TransientError(f"registrar answered {status} to /v1/nodes/{self._node_id}")
        return True
