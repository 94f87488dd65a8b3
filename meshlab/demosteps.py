"""The demo's script and verdict: its steps in order, the checks they record, the summary table. No I/O here.

`meshlab demo` (meshlab.demo) runs STEPS in order and records one Check per thing it verified, with how long
that took. The run holds only if every step ran and every check held: a step that fails stops the demo, and the
steps after it are listed as not run. The summary table is what the README shows as a sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Step:
    """One part of the demo: a short key (the summary's first column) and what it shows."""

    key: str
    title: str


# The brief's final demo, in the order it runs: joining and leaving, tunnels made and torn down on every peer,
# failure detection and recovery on both planes, messaging that succeeds and fails, a node behind NAT.
STEPS: tuple[Step, ...] = (
    Step("control-plane", "registrar and its embedded broker start"),
    Step("join", "n1, n2 (behind NAT) and n3 join one by one; tunnels appear on every peer"),
    Step("nat", "n2 sits behind a NAT router and reaches everyone over the mesh"),
    Step("chat", "chat between every pair of nodes"),
    Step("late-join", "n4 joins the running mesh; traffic between the others is not disturbed"),
    Step("leave", "n4 leaves gracefully; its tunnel disappears everywhere; chat to it fails"),
    Step("agent-crash", "n3's agent is killed (SIGKILL); its tunnels stay; restarted, it is active again"),
    Step("node-crash", "n3 crashes (every process); detected and removed; chat fails; back with the same IP"),
    Step("control-outage", "registrar + broker down (kill -9): ping and chat keep flowing; back with no removal"),
    Step("invariants", "meshlab check at the end: IPs unique and stable, live pairs tunnelled and answering, "
                       "no stale or ghost peer, views converged"),
)
STEP_KEYS = tuple(s.key for s in STEPS)


@dataclass(frozen=True, slots=True)
class Check:
    """One thing the demo verified in `step`: what, whether it held, and how long it took (seconds)."""

    step: str
    what: str
    ok: bool
    seconds: float


def format_check(check: Check) -> str:
    """A check as the timeline prints it: `OK    what (1.2 s)` or `FAIL  what (1.2 s)`."""
    return f"{'OK  ' if check.ok else 'FAIL'}  {check.what} ({check.seconds:.1f} s)"


def verdict(checks: Sequence[Check], *, ran: Sequence[str]) -> int:
    """The demo's exit status: 0 only if every step of STEPS ran and every check held (and there was one)."""
    if not checks or any(not c.ok for c in checks):
        return 1
    return 0 if list(ran) == list(STEP_KEYS) else 1


def not_run(checks: Sequence[Check], *, ran: Sequence[str]) -> list[Step]:
    """The steps the demo never reached: not completed and without a check (the one that failed has its own)."""
    started = {c.step for c in checks}
    return [s for s in STEPS if s.key not in ran and s.key not in started]


def summary_rows(checks: Sequence[Check], *, ran: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """(step, check, result, seconds) per check in the order recorded, then one row per step that did not run."""
    rows = [(c.step, c.what, "ok" if c.ok else "FAIL", f"{c.seconds:.1f}") for c in checks]
    rows += [(s.key, s.title, "not run", "-") for s in not_run(checks, ran=ran)]
    return rows


def format_summary(checks: Sequence[Check], *, ran: Sequence[str], total_s: float) -> str:
    """The summary table (markdown, so the README can show it as it is) and a last line with the verdict."""
    rows = summary_rows(checks, ran=ran)
    header = ("step", "check", "result", "seconds")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(4)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i == 3 else "-") for i, w in enumerate(widths)) + "|"
    failed = sum(1 for c in checks if not c.ok)
    skipped = len(not_run(checks, ran=ran))
    held = "every check held" if verdict(checks, ran=ran) == 0 else f"{failed} check(s) failed, {skipped} step(s) not run"
    tail = f"{len(checks)} checks in {len(ran)} of {len(STEPS)} steps, {total_s:.0f} s: {held}"
    return "\n".join([line(header), rule, *(line(r) for r in rows), "", tail])


def format_peer_counts(counts: Mapping[str, int | None]) -> str:
    """WireGuard peers per node as `wg show` lists them: `n1=2 n2=2 n3=-` (`-`: no interface)."""
    return " ".join(f"{name}={'-' if n is None else n}" for name, n in counts.items())


def expected_peer_counts(members: Sequence[str]) -> dict[str, int]:
    """How many WireGuard peers each of `members` holds in a complete mesh of them: one per other member."""
    return {name: len(members) - 1 for name in members}
