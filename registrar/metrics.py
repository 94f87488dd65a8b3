"""The registrar's counters and numbers: counted by the writer thread, read by any thread (the HTTP API).

Every counter is declared once in COUNTERS with the metric it is exported as, so none can be kept without being
exported (the API renders COUNTERS) and a misspelt one fails at once. Counters sit behind a lock: the writer
adds while HTTP threads take snapshots, and iterating a dict another thread grows is an error.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from meshcontract.messages import MemberState
from registrar.membership import Membership


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """One counter: its key in `numbers()` is `counter_<key>`, exported as meshvpn_registrar_<metric>."""

    key: str
    metric: str
    help: str


COUNTERS: tuple[CounterSpec, ...] = (
    CounterSpec("registrations", "registrations_total", "Registrations answered ok (MQTT and HTTP)."),
    CounterSpec("registrations_refused", "registrations_refused_total", "Registrations refused with an error reply."),
    CounterSpec("joins", "joins_total", "New members admitted."),
    CounterSpec("rejected", "rejected_messages_total", "Inputs rejected as malformed or refused."),
    CounterSpec("ignored", "ignored_messages_total", "Valid inputs without effect (stale epoch, unknown node)."),
    CounterSpec("messages", "messages_total", "MQTT messages received."),
    CounterSpec("roster_publishes", "roster_publishes_total", "Roster publishes (bursts are batched)."),
    CounterSpec("store_errors", "store_errors_total", "Failed store commits (the command was dropped)."),
    CounterSpec(
        "internal_errors", "internal_errors_total", "Commands that failed with an unexpected error (a bug; logged)."
    ),
)


class Counters:
    """The writer's counters (only COUNTERS keys); `add` from the writer, `snapshot` from anywhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = {spec.key: 0 for spec in COUNTERS}

    def add(self, key: str, n: int = 1) -> None:
        """Count `n` more of `key`; KeyError for a key not declared in COUNTERS."""
        with self._lock:
            self._values[key] += n  # a plain dict: an undeclared key raises

    def snapshot(self) -> Mapping[str, int]:
        """A consistent, read-only copy of every counter."""
        with self._lock:
            return MappingProxyType(dict(self._values))


def numbers(
    membership: Membership,
    counters: Mapping[str, int],
    *,
    connected: bool,
    liveness_checked_at: float | None,
) -> dict[str, float]:
    """The values /metrics exports, from one snapshot of the state and of the counters."""
    out = {f"counter_{key}": float(value) for key, value in counters.items()}
    for state in MemberState:
        out[f"members_{state.value}"] = float(membership.count(state))
    out["revision"] = float(membership.revision)
    out["quarantined_ips"] = float(len(membership.ipam.quarantine))
    out["broker_connected"] = 1.0 if connected else 0.0
    if liveness_checked_at is not None:
        out["liveness_checked_at"] = liveness_checked_at
    return out
