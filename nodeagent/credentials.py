"""Which credential the agent logs in to the broker with, and what it learns from refusals and registrations.

Holds the node's own broker password (created 0600 in the state directory before the first connection, so
whatever the registrar stores from our RegisterRequest we hold too, even if we crash or its reply is lost) and
walks the login order of nodeagent.policy.login_order. Thread-safe: paho's thread reports refusals while the
session thread builds connections.
"""

from __future__ import annotations

import logging
import threading

from meshcontract.access import JOIN_PASSWORD_PREFIX
from meshcontract.transport import BrokerSettings
from nodeagent.policy import Login, login_order
from nodeagent.statestore import StateStore

log = logging.getLogger(__name__)

# The contract bounds RegisterRequest.broker_password to this length.
_OFFERABLE = range(16, 129)


class BrokerLogin:
    """The broker credentials of one agent and the order in which to try them."""

    def __init__(
        self, *, broker: BrokerSettings, join_token: str | None, store: StateStore, node_id: str
    ) -> None:
        self._broker = broker
        self._token = join_token
        self._store = store
        self._node_id = node_id
        self._lock = threading.Lock()
        # None when broker.password is configured (pre-provisioned credentials: the only ones we use).
        self._own: str | None = None if broker.password is not None else store.own_broker_password()
        self._order: tuple[Login, ...] = ()
        self._at = 0
        self._reset(accepted=store.broker_password_accepted())

    def _reset(self, *, accepted: bool) -> None:
        with self._lock:
            self._order = login_order(
                configured=self._own is None, own_accepted=accepted, has_token=bool(self._token)
            )
            self._at = 0

    @property
    def has_fallback(self) -> bool:
        """True if a refused login has another credential to try."""
        with self._lock:
            return len(self._order) > 1

    def next_settings(self) -> BrokerSettings:
        """Broker settings for the next connection, with the credential now in turn (username = node id)."""
        with self._lock:
            login = self._order[self._at]
        if login is Login.CONFIGURED:
            password = self._broker.password
        elif login is Login.OWN:
            password = self._own
        else:
            password = JOIN_PASSWORD_PREFIX + (self._token or "")
        log.info("logging in to the broker with %s", login.value, extra={"node_id": self._node_id})
        return self._broker.model_copy(
            update={"username": self._broker.username or self._node_id, "password": password}
        )

    def refused(self) -> None:
        """The broker refused the credential: the next connection tries the next one (see login_order)."""
        with self._lock:
            if len(self._order) < 2:
                return
            refused = self._order[self._at]
            self._at = (self._at + 1) % len(self._order)
            following = self._order[self._at]
        log.warning(
            "broker refused %s; next attempt uses %s",
            refused.value,
            following.value,
            extra={"node_id": self._node_id},
        )

    def offered_password(self) -> str | None:
        """Our own password for the RegisterRequest; None with a configured one (or a legacy one out of range)."""
        own = self._own
        if own is None or len(own) not in _OFFERABLE:
            return None
        return own

    def registered(self, issued_password: str | None) -> None:
        """A registration was accepted: from now on the own password is the one to try first.

        `issued_password` is set only by an older registrar that issues passwords itself: use that from now on.
        """
        if issued_password and self._broker.password is None:
            self._store.save_broker_password(issued_password)
            self._own = issued_password
        if self._own is not None and not self._store.broker_password_accepted():
            # The registrar has an entry for us now (it writes it before answering): log in with it first.
            self._store.mark_broker_password_accepted()
            self._reset(accepted=True)
