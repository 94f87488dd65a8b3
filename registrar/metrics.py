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
    CounterSpec("enrollments", "enrollments_total", "Enrollments answered ok (including retries)."),
    CounterSpec("enrollments_refused", "enrollments_refused_total", "Enrollments refused (token, key, ...)."),
    CounterSpec("auth_failures", "auth_failures_total", "HTTP requests with a wrong node credential or admin token."),
    CounterSpec("rate_limited", "rate_limited_total", "Requests refused because their source sent too many."),
    CounterSpec("flood_dropped", "flood_dropped_total", "MQTT messages dropped: their node sent far too many."),
    CounterSpec("rejected", "rejected_messages_total", "Inputs rejected as malformed or refused."),
    CounterSpec("ignored", "ignored_messages_total", "Valid inputs without effect (stale epoch, unknown node)."),
    CounterSpec("messages", "messages_total", "MQTT messages received."),
    CounterSpec(
        "membership_publishes", "membership_publishes_total", "Membership delta + snapshot publishes (bursts are batched)."
    ),
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
    path_gauges: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The values /metrics exports, from one snapshot of the state and of the counters (and registrar.paths)."""
    out = {f"counter_{key}": float(value) for key, value in counters.items()}
    out.update(path_gauges or {})
    for state in MemberState:
        out[f"members_{state.value}"] = float(membership.count(state))
    out["revision"] = float(membership.revision)
    out["quarantined_ips"] = float(len(membership.ipam.quarantine))
    out["broker_connected"] = 1.0 if connected else 0.0
    if liveness_checked_at is not None:
        out["liveness_checked_at"] = liveness_checked_at
    return out


_GAUGES = [
    ("revision", "Current membership revision.", "revision"),
    ("quarantined_ips", "Released IPs still in quarantine.", "quarantined_ips"),
    ("broker_connected", "1 while connected to the broker.", "broker_connected"),
    ("paths_reporting", "Active members whose path report is current.", "paths_reporting"),
    ("paths_fresh", "Tunnels with a fresh WireGuard handshake, summed over the reports.", "paths_fresh"),
    ("paths_broken", "Tunnels without a fresh handshake, as their source reported them.", "paths_broken"),
    (
        "paths_broken_both_active",
        "Broken tunnels whose both ends reach the control plane: the data plane alone is broken.",
        "paths_broken_both_active",
    ),
    (
        "liveness_checked_timestamp_seconds",
        "When liveness was last judged (unix time); absent before the first check.",
        "liveness_checked_at",
    ),
]


def render_metrics(values: dict[str, float]) -> str:
    """Prometheus text exposition of the registrar's numbers (RegistrarService.metrics())."""
    lines = []

    def family(name: str, kind: str, help_text: str) -> str:
        full = f"meshvpn_registrar_{name}"
        lines.extend([f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"])
        return full

    full = family("members", "gauge", "Members by state.")
    for state in MemberState:
        lines.append(f'{full}{{state="{state.value}"}} {_number(values.get(f"members_{state.value}", 0))}')
    # Every counter the service keeps is declared in registrar.metrics.COUNTERS, so every one is exported.
    for spec in COUNTERS:
        full = family(spec.metric, "counter", spec.help)
        lines.append(f"{full} {_number(values.get(f'counter_{spec.key}', 0))}")
    for name, help_text, key in _GAUGES:
        if key in values:
            full = family(name, "gauge", help_text)
            lines.append(f"{full} {_number(values[key])}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    # Full precision: ':g' would print a counter of 1234567 as 1.23457e+06 and a unix time to the ten seconds.
    return str(int(value)) if float(value).is_integer() else repr(float(value))
