"""Judging a lab's mesh from what each node reports: is it complete, who still holds a tunnel. No I/O here.

A node's view is what its WireGuard interface really holds (one entry per peer: that peer's allowed IPs)
plus the mesh IP its agent reports for itself. The mesh is complete when every expected node has a mesh IP,
the IPs are distinct, and every expected node holds exactly one tunnel to each other expected node and
nothing else (no ghost of a departed node, no duplicate of a restarted one).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NodeTunnels:
    """The tunnels one node holds, as observed: its own mesh IP (None if unknown) and each peer's allowed IPs."""

    name: str
    mesh_ip: str | None
    peers: tuple[tuple[str, ...], ...] = ()  # per WireGuard peer, its allowed IPs without /32

    def tunnel_ips(self) -> set[str]:
        """Every mesh IP this node holds a tunnel to."""
        return {ip for allowed in self.peers for ip in allowed}


def strip_host_prefix(cidr: str) -> str:
    """"100.96.0.5/32" -> "100.96.0.5"; other prefixes are kept as they are (they are not host routes)."""
    return cidr[:-3] if cidr.endswith("/32") else cidr


def mesh_problems(
    views: Mapping[str, NodeTunnels], expected: Collection[str], *, tolerated: Collection[str] = ()
) -> list[str]:
    """Why the mesh of the `expected` node names is not complete; an empty list means it is.

    A tunnel to a `tolerated` node is neither required nor a ghost: a node whose agent was killed while its
    WireGuard still runs answers over the mesh, so peers may rightly keep it (control_lost) until it is back.
    """
    problems: list[str] = []
    ips: dict[str, str] = {}
    for name in sorted(expected):
        view = views.get(name)
        if view is None or view.mesh_ip is None:
            problems.append(f"{name}: no mesh IP known")
        else:
            ips[name] = view.mesh_ip
    for ip, count in Counter(ips.values()).items():
        if count > 1:
            holders = sorted(n for n, i in ips.items() if i == ip)
            problems.append(f"mesh IP {ip} held by {', '.join(holders)}")
    kept = {views[n].mesh_ip for n in tolerated if n in views and views[n].mesh_ip and n not in ips}
    for name in sorted(ips):
        view = views[name]
        want = {ip for other, ip in ips.items() if other != name}
        have = view.tunnel_ips() - kept
        missing = sorted(want - have)
        ghosts = sorted(have - want)
        if missing:
            problems.append(f"{name}: no tunnel to {', '.join(missing)}")
        if ghosts:
            problems.append(f"{name}: ghost tunnel to {', '.join(ghosts)}")
        empty = sum(1 for allowed in view.peers if not allowed)
        if empty:
            problems.append(f"{name}: {empty} peer(s) without allowed IPs (duplicate key for one IP?)")
        held = len(view.peers) - len(view.tunnel_ips() & kept)
        if held != len(want) and not missing and not ghosts and not empty:
            problems.append(f"{name}: {len(view.peers)} peers for {len(want)} members")
    return problems


def holders_of(views: Mapping[str, NodeTunnels], mesh_ip: str, *, among: Collection[str]) -> list[str]:
    """Names (among `among`) whose WireGuard interface still holds a tunnel to `mesh_ip`."""
    return sorted(name for name in among if name in views and mesh_ip in views[name].tunnel_ips())


def parse_wg_allowed_ips(text: str) -> tuple[tuple[str, ...], ...]:
    """Parse `wg show IF allowed-ips` (`<pubkey>\\t<cidr> <cidr>...` or `(none)`) into per-peer IP tuples."""
    peers = []
    for line in text.splitlines():
        if not line.strip():
            continue
        _, _, rest = line.partition("\t")
        cidrs = tuple(strip_host_prefix(c) for c in rest.split() if c != "(none)")
        peers.append(cidrs)
    return tuple(peers)


_ICMP_SEQ = re.compile(r"icmp_seq=(\d+) ")


def parse_ping_summary(text: str) -> tuple[int, int]:
    """(transmitted, received) from iputils ping's summary line; (0, 0) if there is none.

    A probe sent just before ping was interrupted, whose reply ping did not read before exiting, is not
    counted as sent: when every probe up to the last one was answered (per-reply lines show seq 1..n-1 of n
    transmitted), the last one was in flight, not lost. Seen in ~1 of 16 stops on a loaded machine.
    """
    for line in reversed(text.splitlines()):
        if "packets transmitted" in line:
            parts = [p.strip() for p in line.split(",")]
            sent = int(parts[0].split()[0])
            received = int(parts[1].split()[0])
            seqs = {int(m) for m in _ICMP_SEQ.findall(text)}
            if sent == received + 1 and seqs == set(range(1, sent)):
                sent -= 1
            return sent, received
    return 0, 0



def parse_wg_dump(text: str) -> tuple[str, list[tuple[str, tuple[str, ...], float | None]]] | None:
    """Parse `wg show IF dump`: (own public key, [(peer key, allowed IPs without /32, last handshake or None)]).

    The first line is the interface (private key, public key, port, fwmark); each further line a peer (key,
    preshared key, endpoint, allowed IPs comma-separated or "(none)", last handshake in unix seconds, 0 for
    never, rx, tx, keepalive). None for output that is not a dump.
    """
    lines = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not lines or len(lines[0]) < 4:
        return None
    peers = []
    for fields in lines[1:]:
        if len(fields) < 5:
            return None
        allowed = tuple(strip_host_prefix(c) for c in fields[3].split(",") if c and c != "(none)")
        handshake = float(fields[4]) if fields[4].isdigit() and fields[4] != "0" else None
        peers.append((fields[0], allowed, handshake))
    return lines[0][1], peers


_STAMPED = re.compile(r"^\[(\d+\.\d+)\] (?:(?:\d+ bytes from .*icmp_seq=(\d+) )|(?:no answer yet for icmp_seq=(\d+)))")


def ping_outcomes(text: str) -> tuple[dict[int, float], set[int]]:
    """From `ping -D -O` output: (seq -> when ping reported it unanswered, seqs answered, late ones included).

    With -O ping prints "no answer yet for icmp_seq=N" when it sends the next probe without a reply to N; a
    reply that comes later is still printed, so N is lost only if no reply line for it ever appears.
    """
    unanswered: dict[int, float] = {}
    answered: set[int] = set()
    for line in text.splitlines():
        match = _STAMPED.match(line)
        if not match:
            continue
        if match.group(2):
            answered.add(int(match.group(2)))
        else:
            unanswered.setdefault(int(match.group(3)), float(match.group(1)))
    return unanswered, answered


def new_losses(text: str, *, now: float, reported: set[int], grace_s: float) -> list[tuple[int, float]]:
    """Probes lost and not `reported` yet: unanswered and reported so more than `grace_s` before `now` (a late
    reply may still come until then). Sorted by sequence number."""
    unanswered, answered = ping_outcomes(text)
    return sorted((seq, at) for seq, at in unanswered.items()
                  if seq not in answered and seq not in reported and at <= now - grace_s)


def probes_sent(text: str) -> int:
    """The highest sequence number ping has printed anything about (the probes sent so far, near enough)."""
    unanswered, answered = ping_outcomes(text)
    return max([*unanswered, *answered], default=0)
