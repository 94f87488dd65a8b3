"""Presence that follows the data plane: vouching for peers the control plane lost, and the path report.

Two jobs, both feeding the heartbeat (docs/design.md, "Liveness: both planes"):
  - Vouching. A member the registrar lost (will, missed TTL) is published `suspect`; every peer holding a
    tunnel to it pings its mesh IP at once, and one that gets an answer names it in `Heartbeat.alive` (sent at
    once for a suspect). The registrar keeps a vouched member in (`control_lost`: tunnels stay) and drops one
    nobody reaches. Control-lost members are probed again every heartbeat.
  - Path report. How many peers have a fresh WireGuard handshake and which do not, sent when it changes and
    at least every REPORT_EVERY_S, so the registrar can show a path that broke while both ends reach it.

`path_report` and `report_due` are pure; `Presence` runs the probes on a small thread pool (never on paho's
thread or the reconcile loop) and keeps what they found.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from meshcontract.messages import (
    MAX_BROKEN_PATHS,
    MAX_VOUCHES,
    BrokenPath,
    MemberRecord,
    MemberState,
    PathReport,
)
from nodeagent.errors import AgentError
from nodeagent.membership import MemberTable
from nodeagent.ping import Pinger
from wgctl.model import PeerState

log = logging.getLogger(__name__)

# WireGuard refuses a session older than this (REJECT_AFTER_TIME): a handshake this old means no traffic got
# through, keepalives included, for that long.
STALE_HANDSHAKE_S = 180.0
# A tunnel configured this recently may not have had its first handshake yet (retries come every 5 s).
SETTLE_S = 15.0
REPORT_EVERY_S = 60.0
PROBE_WORKERS = 4


def path_report(
    peers: Mapping[str, PeerState],
    *,
    node_of: Mapping[str, str],
    seen_since: Mapping[str, float],
    now: float,
) -> PathReport:
    """The data plane as WireGuard shows it: peers (public key -> state) with a fresh handshake, and the members
    whose tunnel has none — a stale handshake, or none at all after SETTLE_S. Peers that are not members
    (`node_of` maps key -> node id) are left out; so is a tunnel younger than SETTLE_S without a handshake."""
    fresh = 0
    broken: list[BrokenPath] = []
    for key in sorted(peers, key=lambda k: node_of.get(k, "")):
        node = node_of.get(key)
        if node is None:
            continue
        handshake = peers[key].latest_handshake
        if handshake is not None and now - handshake < STALE_HANDSHAKE_S:
            fresh += 1
        elif handshake is not None:
            broken.append(BrokenPath(node_id=node, handshake_age_s=round(max(0.0, now - handshake), 1)))
        elif now - seen_since.get(key, now) >= SETTLE_S:
            broken.append(BrokenPath(node_id=node, handshake_age_s=None))
    return PathReport(fresh=fresh, broken=broken[:MAX_BROKEN_PATHS], truncated=len(broken) > MAX_BROKEN_PATHS)


def report_due(last: PathReport | None, new: PathReport, *, last_at: float | None, now: float) -> bool:
    """Send `new` if it says something else than the last one sent, or that one is REPORT_EVERY_S old."""
    if last is None or last_at is None or now - last_at >= REPORT_EVERY_S:
        return True
    return (last.fresh, [b.node_id for b in last.broken]) != (new.fresh, [b.node_id for b in new.broken])


class Presence:
    """Probes lost members and keeps the vouches and the path report for the next heartbeat.

    `send_now` asks the session for an immediate heartbeat (a suspect must hear from us within the
    registrar's vouch wait, not at our next interval).
    """

    def __init__(self, pinger: Pinger, *, clock: Callable[[], float], send_now: Callable[[], None]) -> None:
        self._pinger = pinger
        self._clock = clock
        self._send_now = send_now
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=PROBE_WORKERS, thread_name_prefix="agent-probe")
        self._in_flight: set[str] = set()
        self._alive: dict[str, float] = {}  # node id -> when a probe last got an answer
        self._vouch_for: frozenset[str] = frozenset()  # members currently suspect or control-lost
        self._seen_since: dict[str, float] = {}  # public key -> when we first saw it configured
        self._last_report: PathReport | None = None
        self._last_report_at: float | None = None
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- vouching ---------------------------------------------------------------------------------------
    def probe(self, membership: MemberTable | None, *, tunnelled: Mapping[str, PeerState], self_id: str) -> None:
        """Probe every suspect or control-lost member we hold a tunnel to (one probe each in flight)."""
        if membership is None:
            return
        lost = [r for r in membership.probed() if r.node_id != self_id and r.public_key in tunnelled]
        with self._lock:
            self._vouch_for = frozenset(r.node_id for r in lost)
            for node in [n for n in self._alive if n not in self._vouch_for]:
                del self._alive[node]
            todo = [r for r in lost if r.node_id not in self._in_flight and not self._closed]
            self._in_flight.update(r.node_id for r in todo)
        for record in todo:
            self._pool.submit(self._probe_one, record)

    def _probe_one(self, record: MemberRecord) -> None:
        try:
            answered = any(rtt is not None for rtt in self._pinger.ping(record.mesh_ip, count=1))
        except AgentError as exc:
            log.warning("cannot probe %s: %s", record.node_id, exc)
            answered = False
        except Exception:  # a probe must never take the pool down; the next heartbeat tries again
            log.exception("probe of %s failed", record.node_id)
            answered = False
        with self._lock:
            self._in_flight.discard(record.node_id)
            if not answered or record.node_id not in self._vouch_for:
                return
            first = record.node_id not in self._alive
            self._alive[record.node_id] = self._clock()
        if first:  # once per loss, not at every heartbeat's probe
            log.info("%s (%s) answers over the mesh; vouching for it", record.node_id, record.state.value,
                     extra={"node_id": record.node_id, "mesh_ip": record.mesh_ip})  # fmt: skip
            if record.state is MemberState.SUSPECT:
                self._send_now()

    def vouches(self, *, within_s: float) -> list[str]:
        """Members to name in the next heartbeat: answered a probe within `within_s` and still lost."""
        now = self._clock()
        with self._lock:
            fresh = sorted(n for n, at in self._alive.items() if n in self._vouch_for and now - at <= within_s)
        return fresh[:MAX_VOUCHES]

    # -- path report ------------------------------------------------------------------------------------
    def report(self, peers: Mapping[str, PeerState], *, node_of: Mapping[str, str]) -> PathReport | None:
        """The path report to send with this heartbeat, or None if the last one sent still says it all."""
        now = self._clock()
        with self._lock:
            for key in peers:
                self._seen_since.setdefault(key, now)
            for key in [k for k in self._seen_since if k not in peers]:
                del self._seen_since[key]
            report = path_report(peers, node_of=node_of, seen_since=self._seen_since, now=now)
            if not report_due(self._last_report, report, last_at=self._last_report_at, now=now):
                return None
            self._last_report, self._last_report_at = report, now
            return report

    def forget_report(self) -> None:
        """The next heartbeat carries a full report (a new session: the registrar may have restarted)."""
        with self._lock:
            self._last_report = self._last_report_at = None
