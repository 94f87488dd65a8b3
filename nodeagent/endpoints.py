"""Which of a peer's advertised endpoints WireGuard gets, and when to try the next one. No I/O here: `now` (unix
time, the clock of WireGuard's handshake times) and the resolved host names are passed in.

Order of a peer's candidates: when its reflexive address is ours too (same NAT, or the same public IP) its local
candidates first (the LAN path), then public, then reflexive; otherwise public, reflexive, local. Host names
are used only once resolved (nodeagent.resolver, off the reconcile path); an unresolved name is skipped.

Choice, per peer and per reconcile pass:
  (a) a handshake younger than FRESH_S (WireGuard's REJECT_AFTER_TIME), and the peer heard from within
      `silent_s` (its received bytes grew; with persistent keepalive a working tunnel hears its peer at least
      every keepalive): the tunnel works, and its endpoint may be one WireGuard learned from the peer's packets
      (roaming, a NAT's mapping). No opinion (None): the plan never overwrites it (wgctl.diff treats a desired
      endpoint of None as "keep"). Silence is what tells a tunnel whose peer moved (a public node that roamed,
      which nodes behind NAT cannot hear from until they send to its new address) long before its handshake
      ages out after 3 minutes. Sooner still: when the peer's candidates changed and nothing was heard from it
      since, MOVED_S after the change the tunnel is not fresh either (its new record is the news of the move).
  (b) no fresh handshake: keep the candidate on trial for TRIAL_S (WireGuard retries a handshake every 5 s, so
      two or three attempts), then move to the next, cycling. A trial starts on the endpoint already configured
      if it is a candidate (no needless write), else on the first candidate. When the peer's candidates change
      during a trial, the cycle starts over from the first: a node's reflexive address reaches its record a
      moment after its first record (enrollment), and a trial of its private address must not hold the peer
      for a full TRIAL_S (bench_nat measured 15 s for every NAT <-> NAT pair at start before this).
Persistent keepalive (the mesh setting) keeps handshakes fresh and NAT mappings open on working tunnels.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from meshcontract.messages import Endpoint, EndpointKind, MemberRecord
from wgctl.diff import canonical_endpoint
from wgctl.model import PeerState

FRESH_S = 180.0  # WireGuard's REJECT_AFTER_TIME: no session key is older than this
TRIAL_S = 12.0
# Beyond the persistent keepalive, how long a working tunnel may stay silent: a keepalive lost once, and
# WireGuard's own retry (REKEY_TIMEOUT, 5 s).
SILENCE_MARGIN_S = 15.0
# After a peer's candidates changed with nothing heard from it since, how long until its new ones are tried: one
# handshake retry (5 s), time for the peer's own packets to arrive if it can reach us by itself.
MOVED_S = 5.0


def silent_after(keepalive_s: int) -> float | None:
    """How long without a byte from a peer means its tunnel no longer works; None without persistent keepalive
    (an idle tunnel is then silent by design)."""
    return keepalive_s + SILENCE_MARGIN_S if keepalive_s > 0 else None

_USUAL = {EndpointKind.PUBLIC: 0, EndpointKind.REFLEXIVE: 1, EndpointKind.LOCAL: 2}
_SAME_NAT = {EndpointKind.LOCAL: 0, EndpointKind.PUBLIC: 1, EndpointKind.REFLEXIVE: 2}


@dataclass(frozen=True, slots=True)
class Trial:
    """The candidate a peer without a fresh handshake is being tried on (canonical IP:port), and since when."""

    endpoint: str
    since: float


@dataclass(frozen=True, slots=True)
class Heard:
    """A peer's received-bytes counter and since when it has had that value (unix time)."""

    rx_bytes: int
    since: float


def hearing(previous: Mapping[str, Heard], actual: Mapping[str, PeerState], *, now: float) -> dict[str, Heard]:
    """Every peer's Heard after this pass: unchanged while its counter stands still, restarted when it moves."""
    heard: dict[str, Heard] = {}
    for key, state in actual.items():
        before = previous.get(key)
        heard[key] = before if before is not None and before.rx_bytes == state.rx_bytes else Heard(state.rx_bytes, now)
    return heard


@dataclass(frozen=True, slots=True)
class Listed:
    """A peer's usable candidates as last seen, and when they last changed (None: unchanged since first seen)."""

    candidates: tuple[str, ...]
    changed_at: float | None = None


def relisted(previous: Listed | None, usable: Sequence[str], *, now: float) -> Listed:
    """The peer's Listed after this pass."""
    current = tuple(usable)
    if previous is None:
        return Listed(current)
    return previous if previous.candidates == current else Listed(current, now)


@dataclass(frozen=True, slots=True)
class Choice:
    """One peer's desired endpoint (None: no opinion), its trial (None: none running) and when to look again."""

    endpoint: str | None
    trial: Trial | None = None
    next_at: float | None = None


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    """The endpoint choices of one reconcile pass, by public key."""

    endpoints: dict[str, str | None] = field(default_factory=dict)
    trials: dict[str, Trial] = field(default_factory=dict)
    # public key -> names of this peer that could not be resolved, when none of its candidates is usable
    unusable: dict[str, tuple[str, ...]] = field(default_factory=dict)
    next_at: float | None = None  # the earliest trial that ends: a pass is due then
    listed: dict[str, Listed] = field(default_factory=dict)  # public key -> its candidates, for the next pass


def is_ip(host: str) -> bool:
    """True if `host` is an IP literal (no lookup needed)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_names(records: Iterable[MemberRecord]) -> set[str]:
    """Every host name (not IP literal) advertised by `records`, lowercased: what the resolver should know."""
    return {e.host.lower() for r in records for e in r.endpoints if not is_ip(e.host)}


def _same_ip(a: str, b: str | None) -> bool:
    if b is None:
        return False
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def ordered(endpoints: Sequence[Endpoint], *, own_reflexive: str | None) -> list[Endpoint]:
    """A peer's candidates in the order to try them (stable within a kind: the peer's own order)."""
    same_nat = any(e.kind is EndpointKind.REFLEXIVE and _same_ip(e.host, own_reflexive) for e in endpoints)
    rank = _SAME_NAT if same_nat else _USUAL
    return sorted(endpoints, key=lambda e: rank[e.kind])


def candidates(
    endpoints: Sequence[Endpoint], *, resolved: Mapping[str, str], own_reflexive: str | None
) -> tuple[list[str], list[str]]:
    """(usable candidates as canonical IP:port in order, host names skipped because they are not resolved)."""
    usable: list[str] = []
    skipped: list[str] = []
    for endpoint in ordered(endpoints, own_reflexive=own_reflexive):
        host = endpoint.host
        if not is_ip(host):
            address = resolved.get(host.lower())
            if address is None:
                skipped.append(host)
                continue
            host = address
        text = canonical_endpoint(f"[{host}]:{endpoint.port}" if ":" in host else f"{host}:{endpoint.port}")
        if text is not None and text not in usable:
            usable.append(text)
    return usable, skipped


def fresh(
    state: PeerState | None,
    *,
    now: float,
    heard: Heard | None = None,
    silent_s: float | None = None,
    changed_at: float | None = None,
) -> bool:
    """True if WireGuard completed a handshake with this peer less than FRESH_S ago and, when `silent_s` is
    given and `heard` known, the peer was heard from less than `silent_s` ago, and not only before its candidates
    changed at `changed_at` (MOVED_S or longer ago)."""
    if not (state and state.latest_handshake and now - state.latest_handshake < FRESH_S):
        return False
    if silent_s is None or heard is None:
        return True
    if changed_at is not None and heard.since <= changed_at and now - changed_at >= MOVED_S:
        return False
    return now - heard.since < silent_s


def choose(
    usable: Sequence[str],
    *,
    actual: PeerState | None,
    trial: Trial | None,
    now: float,
    trial_s: float = TRIAL_S,
    heard: Heard | None = None,
    silent_s: float | None = None,
    changed_at: float | None = None,
) -> Choice:
    """The endpoint to configure for one peer (rules (a) and (b) of the module docstring)."""
    if fresh(actual, now=now, heard=heard, silent_s=silent_s, changed_at=changed_at) or not usable:
        return Choice(None)
    # The peer's candidates changed after the trial began (Listed): start over from the best one.
    changed = trial is not None and changed_at is not None and changed_at > trial.since
    if trial is not None and trial.endpoint in usable and not changed:
        if now - trial.since < trial_s:
            return Choice(trial.endpoint, trial, _next(usable, trial, trial_s))
        nxt = usable[(usable.index(trial.endpoint) + 1) % len(usable)]
    elif changed:
        nxt = usable[0]
    else:
        current = canonical_endpoint(actual.endpoint) if actual is not None else None
        nxt = current if current in usable else usable[0]
    started = Trial(nxt, now)
    return Choice(nxt, started, _next(usable, started, trial_s))


def _next(usable: Sequence[str], trial: Trial, trial_s: float) -> float | None:
    # One candidate: nothing else to move to, no pass is needed when its trial ends.
    return trial.since + trial_s if len(usable) > 1 else None


def plan_endpoints(
    records: Iterable[MemberRecord],
    *,
    actual: Mapping[str, PeerState],
    trials: Mapping[str, Trial],
    resolved: Mapping[str, str],
    failed: Collection[str] = (),
    own_reflexive: str | None,
    now: float,
    trial_s: float = TRIAL_S,
    heard: Mapping[str, Heard] | None = None,
    silent_s: float | None = None,
    listed: Mapping[str, Listed] | None = None,
) -> EndpointPlan:
    """Choose the endpoint of every peer in `records` (keyed by public key in the result).

    `trials` are the previous pass's; the result's replace them. `failed` are names whose lookup failed (not
    merely pending): a peer left without any usable candidate because of them is listed in `unusable`. `heard`
    (this pass's, from `hearing`) and `silent_s` (from `silent_after`) judge a silent tunnel not fresh; `listed`
    (the previous pass's; the result's replace them) tell when a peer's candidates changed.
    """
    heard = heard or {}
    listed = listed or {}
    new_listed: dict[str, Listed] = {}
    endpoints: dict[str, str | None] = {}
    new_trials: dict[str, Trial] = {}
    unusable: dict[str, tuple[str, ...]] = {}
    next_at: list[float] = []
    for record in records:
        key = record.public_key
        usable, skipped = candidates(record.endpoints, resolved=resolved, own_reflexive=own_reflexive)
        seen = new_listed[key] = relisted(listed.get(key), usable, now=now)
        choice = choose(usable, actual=actual.get(key), trial=trials.get(key), now=now, trial_s=trial_s,
                        heard=heard.get(key), silent_s=silent_s, changed_at=seen.changed_at)
        if seen.changed_at is not None and now - seen.changed_at < MOVED_S:
            next_at.append(seen.changed_at + MOVED_S)  # a pass is due when the change makes the tunnel stale
        endpoints[key] = choice.endpoint
        if choice.trial is not None:
            new_trials[key] = choice.trial
        if choice.next_at is not None:
            next_at.append(choice.next_at)
        unresolvable = tuple(name for name in skipped if name.lower() in failed)
        if not usable and unresolvable:
            unusable[key] = unresolvable
    return EndpointPlan(endpoints, new_trials, unusable, min(next_at, default=None), new_listed)
