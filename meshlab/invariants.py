"""The invariants a mesh must hold, judged from one Snapshot of a lab and a memory of earlier ones. Pure: no I/O here.

`check(snapshot, bounds=..., memory=...)` returns findings and the memory for the next look. A finding with a
`deadline` is a condition that is allowed for a while (a peer not removed yet, a view not converged yet): it is a
violation only if it is still found at or after its deadline. One without a deadline is a violation at once
(two members with one IP, a lost probe on a stable pair). The runner looks again while findings are pending;
`meshlab check` does the same once. Bounds come from the lab's heartbeat interval and TTL (Bounds.for_lab;
docs/chaos.md says why each is what it is).

"Healthy" is what the lab did, not what the mesh thinks: a node whose condition is "up" has its agent
running, its link whole and no fault on it. A "live member" is the registrar's member of a healthy node.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

from meshlab.snapshot import SILENT, Leftovers, MemberSeen, NodeSeen, Snapshot

UNIQUE_IPS = "unique-mesh-ips"
STABLE_IP = "ip-stable-per-key"
LIVE_PAIRS = "live-pairs-tunnelled"
NO_STALE_PEER = "no-peer-for-removed-member"
NO_GHOSTS = "no-ghost-or-duplicate-members"
NO_FALSE_REMOVAL = "no-false-removal"
CONVERGED = "views-converge"
ZERO_LOSS = "zero-loss-on-stable-pairs"
NO_LEAKS = "no-leaks-after-down"
INVARIANTS = (UNIQUE_IPS, STABLE_IP, LIVE_PAIRS, NO_STALE_PEER, NO_GHOSTS, NO_FALSE_REMOVAL, CONVERGED,
              ZERO_LOSS, NO_LEAKS)


@dataclass(frozen=True, slots=True)
class Bounds:
    """How long the mesh may take for each thing, in seconds (docs/chaos.md, "Bounds")."""

    interval_s: float
    ttl_s: float
    grace_s: float  # the registrar's grace after a start or reconnect: TTL + interval (its default)
    converge_s: float  # a healthy node (or the control plane) back -> complete tunnels and views
    detect_slack_s: float  # a silent node marked unreachable: after max(silence + TTL, control + grace) + tick
    removal_s: float  # a member unreachable or removed -> every agent connected all along has dropped its peer
    false_removal_slack_s: float  # a declaration this long after a node became healthy is not explained by its fault
    quarantine_s: float = 600.0  # the registrar's default: a freed IP goes to no other node id for this long

    @classmethod
    def for_lab(cls, *, interval_s: float, ttl_s: float, quarantine_s: float = 600.0) -> Bounds:
        """The bounds of a lab with this heartbeat interval and TTL."""
        return cls(interval_s=interval_s, ttl_s=ttl_s, grace_s=ttl_s + interval_s, converge_s=ttl_s + 5.0,
                   detect_slack_s=1.0 + 3.0, removal_s=5.0, false_removal_slack_s=ttl_s, quarantine_s=quarantine_s)

    @property
    def settle_s(self) -> float:
        """The longest a finding can stay pending after the last change: what a settle step may wait."""
        return max(self.converge_s, self.grace_s + self.ttl_s + self.detect_slack_s, self.removal_s)


@dataclass(frozen=True, slots=True)
class Finding:
    """One failed check: which invariant, about what, the evidence, and from when it is a violation."""

    invariant: str
    subject: str
    evidence: str
    deadline: float | None = None

    def is_violation(self, now: float) -> bool:
        return self.deadline is None or now >= self.deadline

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Memory:
    """What earlier looks saw that the next one needs: key -> IP, IP -> last holder, keys held but no
    member since when, and the registrar's revision with the first look that saw it."""

    ip_of_key: Mapping[str, str] = field(default_factory=dict)
    holder_of_ip: Mapping[str, tuple[str, str, float]] = field(default_factory=dict)  # ip -> key, node id, when
    absent_since: Mapping[str, float] = field(default_factory=dict)
    revision: tuple[int, float] | None = None


def violations(findings: Iterable[Finding], now: float) -> list[Finding]:
    """The findings that are violations at `now`."""
    return [f for f in findings if f.is_violation(now)]


def clock(t: float | None) -> str:
    """A time as log lines print it (HH:MM:SS.mmm, local), so evidence can be matched with the logs."""
    if t is None:
        return "never"
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def _short(key: str) -> str:
    return key[:8] + "…"


class _Look:
    """Indexes of one snapshot shared by the rules."""

    def __init__(self, snap: Snapshot, bounds: Bounds, memory: Memory) -> None:
        self.snap = snap
        self.bounds = bounds
        self.memory = memory
        self.now = snap.now
        reg = snap.registrar
        self.members = {m.node_id: m for m in reg.members} if reg else {}
        self.by_key = {m.public_key: m for m in reg.members} if reg else {}
        self.healthy = [n for n in snap.nodes if n.condition == "up"]
        # The registrar's word counts only while it and its broker are up: otherwise nobody can hear it.
        self.control = snap.control_since if reg is not None and reg.broker_connected else None

    def member(self, node: NodeSeen) -> MemberSeen | None:
        return self.members.get(node.node_id or "")

    def after(self, *times: float | None) -> float:
        return max(t for t in times if t is not None)


def _bindings(snap: Snapshot) -> list[tuple[str, str, str | None, str]]:
    """Every (mesh IP, public key, node id or None, where) pairing anything in the snapshot asserts."""
    out: list[tuple[str, str, str | None, str]] = []
    if snap.registrar:
        out += [(m.mesh_ip, m.public_key, m.node_id, "registrar") for m in snap.registrar.members]
    for n in snap.nodes:
        if n.agent and n.agent.mesh_ip and n.wg:
            out.append((n.agent.mesh_ip, n.wg.public_key, n.agent.node_id, f"{n.name} itself"))
        if n.agent:
            out += [(p.mesh_ip, p.public_key, p.node_id, f"{n.name}'s view") for p in n.agent.peers]
        if n.wg:
            out += [(p.allowed_ips[0], p.public_key, None, f"{n.name}'s wg") for p in n.wg.peers
                    if len(p.allowed_ips) == 1]
    return out


def _unique_ips(look: _Look) -> list[Finding]:
    out = []
    if look.snap.registrar:
        holders: dict[str, list[str]] = defaultdict(list)
        for m in look.snap.registrar.members:
            holders[m.mesh_ip].append(m.node_id)
        out += [Finding(UNIQUE_IPS, ip, f"the registrar lists {ip} for {', '.join(sorted(ids))}")
                for ip, ids in sorted(holders.items()) if len(ids) > 1]
    own: dict[str, set[str]] = defaultdict(set)
    for n in look.snap.nodes:
        if n.agent and n.agent.mesh_ip:
            own[n.agent.mesh_ip].add(n.name)
    out += [Finding(UNIQUE_IPS, ip, f"agents {', '.join(sorted(names))} each say {ip} is theirs")
            for ip, names in sorted(own.items()) if len(names) > 1]
    for ip, key, node_id, where in _bindings(look.snap):
        held = look.memory.holder_of_ip.get(ip)
        if held is None or node_id is None or held[0] == key or held[1] == node_id:
            continue  # the same key, or the same node id re-keyed (its own quarantined IP comes back to it)
        age = look.now - held[2]
        if age < look.bounds.quarantine_s:
            out.append(Finding(UNIQUE_IPS, ip, f"{where}: {ip} belongs to {node_id} (key {_short(key)}), but "
                                               f"{held[1]} (key {_short(held[0])}) held it {age:.1f} s ago, "
                                               f"within the {look.bounds.quarantine_s:g} s quarantine"))
    return out


def _stable_ip(look: _Look) -> list[Finding]:
    out = []
    now_of: dict[str, tuple[str, str]] = {}
    for ip, key, _, where in _bindings(look.snap):
        before = look.memory.ip_of_key.get(key)
        if before is not None and before != ip:
            out.append(Finding(STABLE_IP, _short(key), f"{where}: key {_short(key)} now has {ip}, had {before}"))
        elif key in now_of and now_of[key][0] != ip:
            out.append(Finding(STABLE_IP, _short(key), f"key {_short(key)}: {now_of[key][1]} says "
                                                       f"{now_of[key][0]}, {where} says {ip}"))
        now_of.setdefault(key, (ip, where))
    return out


def _ghosts(look: _Look) -> list[Finding]:
    out = []
    lab_ids = {n.node_id for n in look.snap.nodes if n.node_id}
    names: dict[str, list[str]] = defaultdict(list)
    for m in look.members.values():
        names[m.name].append(m.node_id)
        if m.node_id not in lab_ids:
            out.append(Finding(NO_GHOSTS, m.node_id, f"the registrar lists {m.node_id} ({m.name}, {m.mesh_ip}), "
                                                     f"which is no node of this lab"))
    out += [Finding(NO_GHOSTS, name, f"the registrar lists {name} {len(ids)} times: {', '.join(sorted(ids))}")
            for name, ids in sorted(names.items()) if len(ids) > 1]
    for n in look.snap.nodes:
        if n.agent:
            for what, values in (("node id", [p.node_id for p in n.agent.peers]),
                                 ("mesh IP", [p.mesh_ip for p in n.agent.peers]),
                                 ("key", [p.public_key for p in n.agent.peers])):
                dup = sorted({v for v in values if values.count(v) > 1})
                if dup:
                    out.append(Finding(NO_GHOSTS, n.name, f"{n.name}'s view holds {what} {', '.join(dup)} twice"))
            if any(p.node_id == n.agent.node_id for p in n.agent.peers):
                out.append(Finding(NO_GHOSTS, n.name, f"{n.name}'s view lists itself as a peer"))
        if n.wg and any(p.public_key == n.wg.public_key for p in n.wg.peers):
            out.append(Finding(NO_GHOSTS, n.name, f"{n.name}'s interface holds a peer with its own key"))
        # A node the lab silenced must not stay an active member: the registrar decides by the TTL, and not
        # before its grace after a (re)start or reconnect has passed.
        m = look.member(n)
        if look.control is not None and n.condition in SILENT and m is not None and m.state == "active":
            deadline = (look.after(n.since + look.bounds.ttl_s, look.control + look.bounds.grace_s)
                        + look.bounds.detect_slack_s)
            out.append(Finding(NO_GHOSTS, n.name, f"the registrar holds {n.name} active although it has been "
                                                  f"{n.condition} since {clock(n.since)}", deadline))
    return out


def _false_removal(look: _Look) -> list[Finding]:
    if look.control is None:
        return []
    out = []
    for n in look.healthy:
        m = look.member(n)
        if m is None or m.state != "unreachable" or m.unreachable_since is None:
            continue
        healthy_from = look.after(n.since, look.control)
        if m.unreachable_since > healthy_from + look.bounds.false_removal_slack_s:
            out.append(Finding(NO_FALSE_REMOVAL, n.name, f"the registrar declared {n.name} unreachable at "
                                                         f"{clock(m.unreachable_since)}; it has been healthy since "
                                                         f"{clock(n.since)} and the control plane up since "
                                                         f"{clock(look.control)}"))
    return out


def _live_pairs(look: _Look) -> list[Finding]:
    if look.control is None:
        return []
    out = []
    b = look.bounds
    for a in look.healthy:
        due = look.after(a.since, look.control) + b.converge_s
        m_a = look.member(a)
        problem = None
        if a.agent is None:
            problem = "its agent does not answer on its local API"
        elif not (a.agent.ready and a.agent.broker_connected):
            problem = f"its agent is not ready (ready={a.agent.ready}, broker={a.agent.broker_connected})"
        elif a.wg is None:
            problem = "it has no WireGuard interface"
        elif m_a is None:
            problem = "it is no member of the registrar"
        elif m_a.state != "active":
            problem = f"the registrar holds it {m_a.state} since {clock(m_a.unreachable_since)}"
        if problem:
            out.append(Finding(LIVE_PAIRS, a.name, f"{a.name} healthy since {clock(a.since)}: {problem}", due))
            continue
        assert a.wg is not None
        held = {p.public_key: p for p in a.wg.peers}
        for b_node in look.healthy:
            m_b = look.member(b_node)
            if b_node is a or m_b is None:
                continue
            pair_due = look.after(a.since, b_node.since, look.control) + b.converge_s
            peer = held.get(m_b.public_key)
            if peer is None:
                out.append(Finding(LIVE_PAIRS, f"{a.name}->{b_node.name}", f"{a.name} holds no tunnel to "
                                   f"{b_node.name} ({m_b.mesh_ip}, key {_short(m_b.public_key)})", pair_due))
            elif peer.allowed_ips != (m_b.mesh_ip,):
                out.append(Finding(LIVE_PAIRS, f"{a.name}->{b_node.name}", f"{a.name}'s tunnel to {b_node.name} "
                                   f"allows {list(peer.allowed_ips)}, not [{m_b.mesh_ip}]", pair_due))
    healthy = {n.name: n for n in look.healthy}
    for src, dst, answered in look.snap.reach:
        if not answered and src in healthy and dst in healthy:
            due = look.after(healthy[src].since, healthy[dst].since, look.control) + b.converge_s
            out.append(Finding(LIVE_PAIRS, f"{src}->{dst}", f"a ping from {src} to {dst}'s mesh IP got no answer", due))
    return out


def _stale_peers(look: _Look) -> list[Finding]:
    if look.control is None:
        return []
    out = []
    for a in look.healthy:
        if a.wg is None:
            continue
        for peer in a.wg.peers:
            m = look.by_key.get(peer.public_key)
            if m is not None and m.state == "unreachable":
                since = m.unreachable_since if m.unreachable_since is not None else look.now
                what = f"{m.name} ({m.mesh_ip}), unreachable since {clock(since)}"
            elif m is None and peer.public_key != a.wg.public_key:
                since = look.memory.absent_since.get(peer.public_key, look.now)
                what = f"key {_short(peer.public_key)} ({', '.join(peer.allowed_ips) or 'no IP'}), no member since {clock(since)}"
            else:
                continue
            # An agent connected all along drops the peer within `removal`; one that just came back (healed,
            # thawed, restarted) or whose control plane just came back must first reconnect: `converge`.
            due = look.after(since + look.bounds.removal_s, look.after(a.since, look.control) + look.bounds.converge_s)
            out.append(Finding(NO_STALE_PEER, f"{a.name}->{m.name if m else _short(peer.public_key)}",
                               f"{a.name} still holds a tunnel to {what}", due))
    return out


def _converged(look: _Look) -> list[Finding]:
    reg = look.snap.registrar
    if look.control is None or reg is None:
        return []
    out = []
    seen_at = look.memory.revision[1] if look.memory.revision and look.memory.revision[0] == reg.revision else look.now
    for a in look.healthy:
        view = a.agent
        if view is None:
            continue  # reported by live-pairs
        due = look.after(a.since, look.control, seen_at) + look.bounds.converge_s
        if view.membership_revision < reg.revision or not view.membership_complete:
            out.append(Finding(CONVERGED, a.name, f"{a.name}'s view is at revision {view.membership_revision} "
                               f"(complete: {view.membership_complete}); the registrar is at {reg.revision} "
                               f"since {clock(seen_at)}", due))
        elif view.membership_revision == reg.revision:
            want = {(m.node_id, m.public_key, m.mesh_ip, m.state) for m in reg.members if m.node_id != view.node_id}
            have = {(p.node_id, p.public_key, p.mesh_ip, p.state) for p in view.peers}
            if want != have:
                missing = sorted(f"{w[0]}:{w[3]}" for w in want - have)
                extra = sorted(f"{h[0]}:{h[3]}" for h in have - want)
                out.append(Finding(CONVERGED, a.name, f"{a.name}'s view and the registrar share revision "
                                   f"{reg.revision} but differ: registrar only {missing}, agent only {extra}"))
    return out


def _zero_loss(look: _Look) -> list[Finding]:
    return [Finding(ZERO_LOSS, f"{t.src}->{t.dst}", f"{len(t.lost)} of {t.sent} probes lost: " + ", ".join(
        f"seq {seq} at {clock(at)}" for seq, at in t.lost[:10]) + (" …" if len(t.lost) > 10 else ""))
        for t in look.snap.traffic if t.lost]


REGISTRAR_VS_NODES = frozenset({LIVE_PAIRS, NO_STALE_PEER, CONVERGED})
RULES = (_unique_ips, _stable_ip, _ghosts, _false_removal, _live_pairs, _stale_peers, _converged, _zero_loss)


def remember(snap: Snapshot, memory: Memory) -> Memory:
    """The memory after `snap`: bindings first seen, IP holders, keys held without a member, the revision."""
    ip_of_key = dict(memory.ip_of_key)
    holders = dict(memory.holder_of_ip)
    for ip, key, node_id, _ in _bindings(snap):
        ip_of_key.setdefault(key, ip)
        if node_id is not None:
            holders[ip] = (key, node_id, snap.now)
    absent = dict(memory.absent_since)
    revision = memory.revision
    if snap.registrar is not None:
        members = {m.public_key for m in snap.registrar.members}
        held = {p.public_key for n in snap.nodes if n.wg for p in n.wg.peers}
        absent = {k: v for k, v in absent.items() if k in held and k not in members}
        for key in sorted(held - members):
            absent.setdefault(key, snap.now)
        if revision is None or revision[0] != snap.registrar.revision:
            revision = (snap.registrar.revision, snap.now)
    return replace(memory, ip_of_key=ip_of_key, holder_of_ip=holders, absent_since=absent, revision=revision)


def check(snap: Snapshot, *, bounds: Bounds, memory: Memory | None = None) -> tuple[list[Finding], Memory]:
    """Every finding in `snap` (violations and pending ones) and the memory for the next look."""
    memory = memory or Memory()
    look = _Look(snap, bounds, memory)
    findings = [f for rule in RULES for f in rule(look)]
    if not snap.registrar_steady:
        # The registrar changed while the nodes were read: its word and theirs may be from different moments.
        # What compares them stays pending until a steady look says the same.
        findings = [replace(f, deadline=max(f.deadline or snap.now, snap.now + bounds.interval_s))
                    if f.invariant in REGISTRAR_VS_NODES else f for f in findings]
    return findings, remember(snap, memory)


def check_leftovers(left: Leftovers) -> list[Finding]:
    """After `down`: every namespace, socket, interface or process the lab left behind is a violation."""
    out = [Finding(NO_LEAKS, ns, f"namespace {ns} still exists") for ns in left.namespaces]
    out += [Finding(NO_LEAKS, s, f"wireguard-go socket {s} still exists") for s in left.wg_sockets]
    out += [Finding(NO_LEAKS, link, f"interface {link} still exists in the host namespace") for link in left.links]
    out += [Finding(NO_LEAKS, p.split()[0], f"process still running: {p}") for p in left.processes]
    return out
