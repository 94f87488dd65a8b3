"""Per-pair reachability from the agents' path reports: which tunnels have no fresh handshake. Pure, no I/O.

Agents send a PathReport in a heartbeat when what they see changes (and at least every minute): how many of
their peers have a fresh WireGuard handshake, and each one that does not. The registrar keeps the newest report
of each member in memory only (not in the store, not in the membership revision: it changes with traffic, not
with membership) and answers "which paths are broken while both ends reach the control plane?" from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from meshcontract.messages import MemberState, PathReport
from registrar.membership import Membership


@dataclass(frozen=True, slots=True)
class Report:
    """One member's newest path report and when it arrived."""

    at: float
    epoch: int
    report: PathReport


@dataclass(frozen=True, slots=True)
class BrokenPair:
    """A tunnel `source` holds to `target` without a fresh handshake, as `source` reported it at `reported_at`."""

    source: str
    target: str
    handshake_age_s: float | None  # None: never a handshake since the tunnel was configured
    reported_at: float
    both_active: bool  # both ends reach the control plane: the data plane alone is broken


Paths = Mapping[str, Report]
EMPTY: Paths = MappingProxyType({})


def update(paths: Paths, *, node_id: str, epoch: int, report: PathReport, now: float) -> Paths:
    """`paths` with `node_id`'s newest report."""
    table = dict(paths)
    table[node_id] = Report(at=now, epoch=epoch, report=report)
    return MappingProxyType(table)


def current(paths: Paths, membership: Membership) -> dict[str, Report]:
    """The reports that still speak for their sender: a member, active, and of its current session."""
    out = {}
    for node, rep in paths.items():
        member = membership.members.get(node)
        if member is not None and member.state is MemberState.ACTIVE and rep.epoch >= member.epoch:
            out[node] = rep
    return out


def broken_pairs(paths: Paths, membership: Membership) -> list[BrokenPair]:
    """Every broken path the current reports name, towards members that still exist, sorted."""
    pairs = []
    for source, rep in sorted(current(paths, membership).items()):
        for path in rep.report.broken:
            target = membership.members.get(path.node_id)
            if target is None or path.node_id == source:
                continue
            pairs.append(
                BrokenPair(
                    source=source,
                    target=path.node_id,
                    handshake_age_s=path.handshake_age_s,
                    reported_at=rep.at,
                    both_active=target.state is MemberState.ACTIVE,
                )
            )
    return pairs


def summary(paths: Paths, membership: Membership) -> dict[str, float]:
    """Gauges for /metrics: members reporting, fresh paths, broken paths (and those while both ends are active)."""
    reports = current(paths, membership)
    pairs = broken_pairs(paths, membership)
    return {
        "paths_reporting": float(len(reports)),
        "paths_fresh": float(sum(r.report.fresh for r in reports.values())),
        "paths_broken": float(len(pairs)),
        "paths_broken_both_active": float(sum(p.both_active for p in pairs)),
    }
