"""`meshlab demo`: the brief's final demo in one run, every step checked and timed, ending with a summary table.

The steps (meshlab.demosteps.STEPS): the control plane starts; n1, n2 (behind a NAT router of its own) and n3 join
one by one and every peer's WireGuard interface gains the newcomer's tunnel; n2 reaches everyone over the mesh;
chat between every pair; a late node n4 joins the running mesh under a continuous ping, then leaves gracefully
and its tunnel disappears everywhere while chat to it fails; n3's agent is killed (its tunnels stay: the data
plane still answers) and restarted; n3 crashes outright (detected, removed everywhere, chat fails) and comes back
with the same mesh IP; the registrar and its embedded broker are killed for three heartbeat TTLs while ping and
chat keep flowing, and come back without removing anyone; last, `meshlab check`'s invariants hold.

Every check reads an interface meant for machines: `wg show` in each namespace (the tunnels), the registrar's
API (member states, endpoints), the agents' local API (broker connection, counters), meshchat's exit status and
JSON events, ping's exit status and summary. Every wait is a condition polled up to a deadline; the only
timed wait is how long the control plane stays down, which is the fault itself, not a proof. The lab is removed
at the end, also on Ctrl-C, SIGTERM or failure, and the summary is printed last.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence

from meshcontract.errors import ContractError
from meshlab import system
from meshlab.checkloop import describe, settle
from meshlab.demosteps import (
    STEPS,
    Check,
    expected_peer_counts,
    format_check,
    format_peer_counts,
    format_summary,
    verdict,
)
from meshlab.errors import LabError, NotReadyError
from meshlab.invariants import Bounds, Memory
from meshlab.lab import Lab
from meshlab.meshview import holders_of
from meshlab.report import format_matrix
from meshlab.settings import LabSettings
from meshlab.state import ProcessRecord
from meshlab.timeline import Timeline
from meshlab.topology import PUBLIC_PLACEMENT, Placement
from meshlab.waiting import wait_for

CONVERGE_S = 30.0  # deadline for anything the mesh must reach on its own (join, removal, recovery)
CHAT_TIMEOUT_S = 3.0
LISTEN_COUNT = 1000  # a listener runs for the whole demo; it exits after this many messages
OUTAGE_TTLS = 3  # the control plane stays down this many heartbeat TTLs: long enough to expire everyone naively


class StepFailed(Exception):
    """A check of the current step did not hold: the demo stops there."""


class Demo:
    """Runs the steps on one lab, printing a timeline, and keeps the checks for the summary."""

    def __init__(self, settings: LabSettings, *, lab_id: str | None = None,
                 out: Callable[[str], None] = print) -> None:
        self.timeline = Timeline(start=time.monotonic())
        self.out = out
        self.lab = Lab(settings, report=lambda line: self.say(line, kind="lab"))
        self.checks: list[Check] = []
        self.ran: list[str] = []
        self.step = ""
        self.listeners: dict[str, ProcessRecord] = {}
        self.sent = 0
        self.lab_id = lab_id

    # --- printing and checking ---------------------------------------------------------------------------

    def say(self, text: str, *, kind: str = "") -> None:
        self.out(self.timeline.record(time.monotonic(), text, kind=kind))

    def block(self, text: str) -> None:
        for line in text.splitlines():
            self.out(" " * 12 + line)

    def record(self, what: str, ok: bool, seconds: float) -> None:
        """Keep a check and print it; StepFailed if it did not hold."""
        check = Check(self.step, what, ok, seconds)
        self.checks.append(check)
        self.say(format_check(check), kind="check")
        if not ok:
            raise StepFailed(what)

    def within(self, what: str, condition: Callable[[], object], *, since: float | None = None,
               timeout: float = CONVERGE_S) -> None:
        """Wait for `condition` up to `timeout` and record the check with the seconds since `since` (the fault
        or action it follows; default: the start of the wait)."""
        start = time.monotonic() if since is None else since
        try:
            wait_for(condition, timeout=timeout, what=what, interval=0.2)
        except NotReadyError as exc:
            self.record(str(exc), False, time.monotonic() - start)
        self.record(what, True, time.monotonic() - start)

    def run(self) -> None:
        for step in STEPS:
            self.step = step.key
            started = time.monotonic()
            self.say(f"== {step.key}: {step.title}", kind="step")
            getattr(self, "step_" + step.key.replace("-", "_"))()
            self.ran.append(step.key)
            self.say(f"== {step.key}: done in {time.monotonic() - started:.1f} s", kind="step")

    # --- observation helpers -----------------------------------------------------------------------------

    def peer_counts(self, names: Sequence[str]) -> dict[str, int | None]:
        """WireGuard peers each node's interface holds (`wg show IF allowed-ips`); None: no interface."""
        out: dict[str, int | None] = {}
        for name in names:
            peers = self.lab.wg_peers(name)
            out[name] = None if peers is None else len(peers)
        return out

    def tunnels_settle(self, what: str, members: Sequence[str], *, start: float) -> None:
        """Wait until the mesh of `members` is complete (each holds exactly one tunnel to each other, no ghost)
        and every member's `wg show` counts its peers right; print the counts. Timed from `start`."""
        want = expected_peer_counts(members)
        seen: dict[str, int | None] = {}
        problems: list[str] = []

        def settled() -> bool:
            seen.update(self.peer_counts(members))
            problems[:] = self.lab.mesh_problems(members)
            return seen == want and not problems

        try:
            wait_for(settled, timeout=CONVERGE_S, what=what, interval=0.2)
        except NotReadyError as exc:
            self.record(f"{exc} (wg show peers: {format_peer_counts(seen)}): {'; '.join(problems)}", False,
                        time.monotonic() - start)
        self.record(f"{what} (wg show peers: {format_peer_counts(seen)})", True, time.monotonic() - start)

    def member_states(self) -> dict[str, str]:
        """Each node's membership state as the registrar's API gives it (node name -> state)."""
        (nodes,) = self.lab.control.registrar_api(["/v1/nodes"])
        by_id = {n.node_id: n.name for n in self.lab.state().ordered_nodes()}
        if not isinstance(nodes, list):
            return {}
        return {by_id[m["node_id"]]: m["state"] for m in nodes if m.get("node_id") in by_id}

    def state_is(self, name: str, state: str) -> Callable[[], bool]:
        return lambda: self.member_states().get(name) == state

    def counters(self, names: Sequence[str], key: str) -> dict[str, int | None]:
        """One counter of each agent's local API status (None: the agent did not answer)."""
        out: dict[str, int | None] = {}
        for name in names:
            status = self.lab.agent_status(name)
            out[name] = None if status is None else status.counters.get(key, 0)
        return out

    # --- chat --------------------------------------------------------------------------------------------

    def listen(self, name: str) -> None:
        """Start `meshchat listen --json` on `name` for the rest of the demo and wait until it listens."""
        self.listeners[name] = self.lab.chat_listen(name, count=LISTEN_COUNT)
        wait_for(lambda: self.lab.chat_listening(name), timeout=CONVERGE_S, what=f"{name}'s chat listener")

    def chat(self, src: str, dst: str) -> tuple[bool, str, float]:
        """Send one message; (delivered and acknowledged, meshchat's verdict, seconds). Printed either way."""
        self.sent += 1
        text = f"#{self.sent} hello {dst}, this is {src}"
        started = time.monotonic()
        ok, why = self.lab.chat_send(src, dst, text, timeout_s=CHAT_TIMEOUT_S)
        if ok:
            # Acknowledged means the receiver has it; its listener's JSON events show it too.
            wait_for(lambda: any(m.text == text for m in self.lab.chat_received(dst)), timeout=10,
                     what=f"{dst} shows the message from {src}")
        self.block(f"chat {src} -> {dst}: {why or ('delivered' if ok else 'not delivered')}")
        return ok, why, time.monotonic() - started

    def chat_all(self, pairs: Sequence[tuple[str, str]], what: str) -> None:
        started = time.monotonic()
        results = [self.chat(src, dst)[0] for src, dst in pairs]
        self.record(f"{what}: {sum(results)}/{len(pairs)} delivered and acknowledged", all(results),
                    time.monotonic() - started)

    def chat_fails(self, src: str, dst: str) -> None:
        ok, why, took = self.chat(src, dst)
        reason = why.removeprefix("meshchat: ").split(": ", 1)[-1] or "no verdict"
        self.record(f"chat {src} -> {dst} not delivered, visibly ({reason})", not ok, took)

    def ping_fails(self, src: str, dst: str) -> None:
        started = time.monotonic()
        answered = self.lab.ping(src, dst, count=2, wait_s=1.0)
        self.record(f"ping {src} -> {dst} ({self.lab.mesh_ip(dst)}) gets no answer", not answered,
                    time.monotonic() - started)

    def reach_all(self, names: Sequence[str], what: str, *, tcp: bool = False) -> None:
        started = time.monotonic()
        matrix = self.lab.reachability(names, tcp=tcp, timeout_s=20)
        self.block(format_matrix(list(names), matrix.answered("ping")))
        self.record(f"{what}" + ("" if matrix.ok() else f": {matrix.failures()}"), matrix.ok(),
                    time.monotonic() - started)

    # --- the steps ---------------------------------------------------------------------------------------

    def step_control_plane(self) -> None:
        lab = self.lab
        started = time.monotonic()
        self.say(f"lab directory {lab.store.root}")
        lab.up(0, lab_id=self.lab_id)
        health = lab.control.registrar_health(lab.plan()) or {}
        self.record("registrar ready (GET /healthz), embedded broker up, join token created",
                    health.get("ready") is True, time.monotonic() - started)

    def step_join(self) -> None:
        lab = self.lab
        members: list[str] = []
        for placement in (PUBLIC_PLACEMENT, Placement("nat"), PUBLIC_PLACEMENT):
            started = time.monotonic()
            record = lab.add(placement)
            members.append(record.name)
            where = f"behind NAT router {record.router}" if record.router else "public"
            self.say(f"{record.name} joined as {lab.mesh_ip(record.name)} ({where}, underlay {record.underlay_ip})")
            self.tunnels_settle(f"{record.name} joined as {lab.mesh_ip(record.name)}, tunnels on every node",
                                members, start=started)
            self.listen(record.name)

    def step_nat(self) -> None:
        lab = self.lab
        st = lab.state()
        n2 = st.node("n2")
        router = st.routers[n2.router] if n2.router else None
        if router is None:
            self.record("n2 sits behind a NAT router", False, 0.0)
            return
        node_id = n2.node_id

        def reflexive() -> list[str]:
            (nodes,) = lab.control.registrar_api(["/v1/nodes"])
            member = next((m for m in nodes or [] if m.get("node_id") == node_id), {})
            return [e["host"] for e in member.get("endpoints", []) if e.get("kind") == "reflexive"]

        self.within(f"n2 at {n2.underlay_ip} behind {router.name}; the registrar sees it from {router.lan_ip}",
                    lambda: router.lan_ip in reflexive())
        self.reach_all(["n1", "n2", "n3"], "ping and TCP echo over mesh IPs, every ordered pair", tcp=True)

    def step_chat(self) -> None:
        names = ["n1", "n2", "n3"]
        self.chat_all([(a, b) for a in names for b in names if a != b], "chat between every ordered pair")

    def step_late_join(self) -> None:
        lab = self.lab
        pinger, pinging = lab.start_pinger("n1", "n3"), time.monotonic()
        try:
            started = time.monotonic()
            record = lab.add(PUBLIC_PLACEMENT)
            self.tunnels_settle(f"{record.name} joined the running mesh as {lab.mesh_ip(record.name)}",
                                ["n1", "n2", "n3", record.name], start=started)
            self.listen(record.name)
            self.chat_all([(record.name, "n1"), ("n2", record.name)], f"chat with {record.name}")
        finally:
            sent, received = pinger.stop()
        self.record(f"continuous ping n1 -> n3 meanwhile: {received}/{sent} answered", 0 < sent == received,
                    time.monotonic() - pinging)

    def step_leave(self) -> None:
        lab = self.lab
        others = ["n1", "n2", "n3"]
        ip = lab.mesh_ip("n4")
        started = time.monotonic()
        lab.stop("n4")
        self.within("registrar: n4 unreachable (it said goodbye)", self.state_is("n4", "unreachable"),
                    since=started)
        self.tunnels_settle(f"no peer holds a tunnel to n4 ({ip}) any more", others, start=started)
        self.ping_fails("n1", "n4")
        self.chat_fails("n1", "n4")

    def step_agent_crash(self) -> None:
        lab = self.lab
        ip = lab.mesh_ip("n3")
        started = time.monotonic()
        lab.kill("n3")
        self.within("registrar: n3 control_lost (peers still reach it over the mesh)",
                    self.state_is("n3", "control_lost"), since=started)
        peers = lab.views(["n1", "n2"])
        self.record(f"n1 and n2 keep their tunnel to n3 (wg show peers: "
                    f"{format_peer_counts(self.peer_counts(['n1', 'n2']))})",
                    holders_of(peers, ip, among=["n1", "n2"]) == ["n1", "n2"], time.monotonic() - started)
        answered = lab.ping("n1", "n3", count=3)
        self.record("ping n1 -> n3 still answers: the data plane needs no agent", answered,
                    time.monotonic() - started)
        started = time.monotonic()
        lab.start("n3")
        self.record(f"n3's agent restarted with the same mesh IP {ip}", lab.mesh_ip("n3") == ip,
                    time.monotonic() - started)
        self.within("registrar: n3 active again", self.state_is("n3", "active"), since=started)

    def step_node_crash(self) -> None:
        lab = self.lab
        ip = lab.mesh_ip("n3")
        started = time.monotonic()
        lab.crash("n3")
        self.listeners.pop("n3", None)  # died with the node
        self.within("registrar: n3 unreachable (lost on both planes)", self.state_is("n3", "unreachable"),
                    since=started)
        self.tunnels_settle(f"n1 and n2 removed the tunnel to n3 ({ip})", ["n1", "n2"], start=started)
        self.ping_fails("n1", "n3")
        self.chat_fails("n2", "n3")
        started = time.monotonic()
        lab.start("n3")
        self.record(f"n3 restarted with the same mesh IP {ip}", lab.mesh_ip("n3") == ip, time.monotonic() - started)
        self.tunnels_settle("its tunnels are back on every peer", ["n1", "n2", "n3"], start=started)
        self.listen("n3")
        self.chat_all([("n3", "n1"), ("n2", "n3")], "chat with n3 after its recovery")

    def step_control_outage(self) -> None:
        lab = self.lab
        names = ["n1", "n2", "n3"]
        ttl = lab.state().heartbeat_ttl_s
        removed_before = self.counters(names, "peer_removed")
        pingers = {(a, b): lab.start_pinger(a, b) for a, b in (("n1", "n2"), ("n3", "n1"))}
        pinging = time.monotonic()
        try:
            down_at = time.monotonic()
            lab.faults.kill_registrar()
            self.within("every agent sees the control plane gone (local API: broker disconnected)",
                        lambda: all((s := lab.agent_status(n)) is not None and not s.broker_connected
                                    for n in names), since=down_at)
            self.chat_all([("n1", "n2"), ("n2", "n3")], "chat while the control plane is down")
            self.reach_all(names, "ping between every ordered pair while the control plane is down")
            hold = OUTAGE_TTLS * ttl
            # The outage itself: not a proof of anything, the checks around it are.
            wait_for(lambda: time.monotonic() - down_at >= hold, timeout=hold + 1, what="outage length")
            counts = self.peer_counts(names)
            self.record(f"after {time.monotonic() - down_at:.1f} s down ({OUTAGE_TTLS} x TTL) every tunnel is still "
                        f"there (wg show peers: {format_peer_counts(counts)})",
                        counts == expected_peer_counts(names), time.monotonic() - down_at)
            started = time.monotonic()
            lab.registrar("start")
            self.within("every agent is back on the broker and registered (local API: ready)",
                        lambda: all((s := lab.agent_status(n)) is not None and s.ready and s.broker_connected
                                    for n in names), since=started)
            self.no_false_removal(names, removed_before, window=2 * ttl + 2, start=started)
        finally:
            losses = {pair: pinger.stop() for pair, pinger in pingers.items()}
        for (a, b), (sent, received) in losses.items():
            self.record(f"continuous ping {a} -> {b} across the outage: {received}/{sent} answered",
                        0 < sent == received, time.monotonic() - pinging)

    def no_false_removal(self, names: Sequence[str], removed_before: dict[str, int | None], *, window: float,
                         start: float) -> None:
        """For `window` seconds after the control plane is back (its grace period and a vouch wait), nobody is
        declared unreachable and no agent removes a peer; at the end every member is active."""
        seen: list[str] = []

        def removal() -> bool:
            states = self.member_states()
            seen[:] = [f"{n} {states.get(n)}" for n in names if states.get(n) == "unreachable"]
            now_removed = self.counters(names, "peer_removed")
            # An agent that did not answer this time is no evidence either way.
            seen.extend(f"{n} removed a peer" for n in names
                        if now_removed[n] is not None and now_removed[n] != removed_before[n])
            return bool(seen)

        watched = time.monotonic()
        wait_for(lambda: removal() or time.monotonic() - watched >= window, timeout=window + CONVERGE_S,
                 what="the watch after the outage")
        self.record(f"no member declared unreachable, no agent removed a peer for {window:.0f} s after the return"
                    + (f": {', '.join(seen)}" if seen else ""), not seen, time.monotonic() - start)
        self.within("registrar: n1, n2, n3 active",
                    lambda: all(self.member_states().get(n) == "active" for n in names))

    def step_invariants(self) -> None:
        st = self.lab.state()
        bounds = Bounds.for_lab(interval_s=st.heartbeat_interval_s, ttl_s=st.heartbeat_ttl_s)
        found, _ = settle(self.lab, bounds=bounds, memory=Memory(), probe=True, limit_s=bounds.settle_s + 5)
        for finding in found.violations:
            self.block(f"VIOLATION {describe(finding)}")
        for finding in found.pending:
            self.block(f"still pending {describe(finding)}")
        self.record(f"meshlab check: {len(found.violations)} violation(s) in {found.looks} look(s)", found.ok,
                    found.took_s)


def run_demo(settings: LabSettings, *, keep: bool = False, lab_id: str | None = None,
             out: Callable[[str], None] = print) -> int:
    """Run the demo in `settings.lab_dir` (lab id `lab_id`, default random), remove the lab (unless `keep` and
    it held), print the summary table. The exit status: 0 only if every step ran and every check held, 130 if
    interrupted."""
    demo = Demo(settings, lab_id=lab_id, out=out)
    lab = demo.lab
    if lab.store.recorded_id():
        demo.say(f"removing a lab left in {lab.store.root} by an earlier run")
        lab.down()

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    interrupted = False
    try:
        demo.run()
    except StepFailed:
        demo.say(f"step {demo.step} failed: the demo stops here", kind="demo")
    except KeyboardInterrupt:
        interrupted = True
        demo.say("interrupted", kind="demo")
    except (LabError, ContractError) as exc:
        demo.checks.append(Check(demo.step, f"{type(exc).__name__}: {exc}", False, 0.0))
        demo.say(f"step {demo.step} failed: {exc}", kind="demo")
        demo.say(f"logs: {lab.store.root}/control/registrar.log, {lab.store.root}/nodes/*/agent.log", kind="demo")
    finally:
        signal.signal(signal.SIGTERM, previous)
        status = 130 if interrupted else verdict(demo.checks, ran=demo.ran)
        if keep and status == 0:
            demo.say(f"lab kept in {lab.store.root}: meshlab --lab-dir {lab.store.root} down", kind="demo")
        else:
            demo.say("cleaning up", kind="demo")
            for record in demo.listeners.values():
                system.stop_record(record, timeout_s=3)
            lab.down()
    demo.out("")
    demo.out(format_summary(demo.checks, ran=demo.ran, total_s=time.monotonic() - demo.timeline.start))
    return status
