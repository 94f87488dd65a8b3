"""The broker credential the agent logs in with: its own password (from enrollment) or a configured one.

The node's own broker password is created (random, 192 bits, 0600) in the state directory before it enrolls;
the registrar stores its hash and creates the node's broker account with it. A configured `broker.password`
(pre-provisioned credentials, e.g. a broker the registrar does not manage) replaces it. The broker username is
always the node id: the access rules are written against it.
"""

from __future__ import annotations

import logging

from meshcontract.transport import BrokerSettings
from nodeagent.statestore import StateStore

log = logging.getLogger(__name__)


class BrokerLogin:
    """Broker settings for each new connection, with this node's credential."""

    def __init__(self, *, broker: BrokerSettings, store: StateStore, node_id: str) -> None:
        self.broker = broker  # where and how (URL, TLS, keepalive), resolved from settings and enrollment
        self._broker = broker
        self._node_id = node_id
        self._password = broker.password if broker.password is not None else store.own_broker_password()
        self.configured = broker.password is not None

    def next_settings(self) -> BrokerSettings:
        """Broker settings for the next connection (username = node id unless configured)."""
        return self._broker.model_copy(
            update={"username": self._broker.username or self._node_id, "password": self._password}
        )
