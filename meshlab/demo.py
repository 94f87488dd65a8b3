"""`meshlab demo`: the README's demo, printed as a timeline relative to its start.

Embedded broker + registrar, three nodes, a ping matrix over mesh IPs, chat messages peer to peer, then a
node crash (agent and wireguard-go killed): the others drop its tunnel because the registrar marks it
unreachable, chat to it fails; it restarts with the same mesh IP and the mesh is complete again. The lab is
removed at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import importlib.util
import signal
import time
from collections.abc import Callable

from meshcontract.errors import ContractError
from meshlab import system
from meshlab.errors import LabError
from meshlab.lab import Lab
from meshlab.meshview import holders_of
from meshlab.report import format_matrix
from meshlab.settings import LabSettings
from meshlab.timeline import Timeline
from meshlab.waiting import wait_for

NODES = 3


def _chat_available() -> bool:
    # The chat is another package: look for it without importing it (meshlab depends on no other service).
    return importlib.util.find_spec("desktop_chat.cli") is not None


class Demo:
    """The demo's steps, each printing timeline lines as it goes."""

    def __init__(self, settings: LabSettings, *, out: Callable[[str], None] = print) -> None:
        self.timeline = Timeline(start=time.monotonic())
        self.out = out
        self.lab = Lab(settings, report=lambda line: self.say(line, kind="lab"))
        self.failures: list[str] = []

    def say(self, text: str, *, kind: str = "") -> None:
        self.out(self.timeline.record(time.monotonic(), text, kind=kind))

    def block(self, text: str) -> None:
        for line in text.splitlines():
            self.out(" " * 12 + line)

    def check(self, ok: bool, text: str) -> None:
        self.say(("OK    " if ok else "FAIL  ") + text, kind="check")
        if not ok:
            self.failures.append(text)

    def ping_matrix(self, names: list[str]) -> bool:
        results: dict[tuple[str, str], bool | None] = {}
        for src in names:
            for dst in names:
                if src != dst:
                    # The first packet to a fresh peer waits for the WireGuard handshake: allow a retry.
                    results[(src, dst)] = self.lab.ping(src, dst) or self.lab.ping(src, dst, count=2)
        self.block(format_matrix(names, results))
        return all(results.values())

    def run(self) -> None:
        lab = self.lab
        names = [f"n{i}" for i in range(1, NODES + 1)]
        self.say(f"building a lab of {NODES} nodes (embedded broker + registrar) in {lab.store.root}")
        lab.up(NODES)
        took = lab.wait_mesh(names, timeout=30)
        self.check(True, f"full mesh: every node holds a tunnel to every other ({took:.1f} s after the last join)")
        self.block("\n".join(f"{n}  {lab.mesh_ip(n)}" for n in names))

        self.say("ping matrix over mesh IPs", kind="data")
        self.check(self.ping_matrix(names), "every ordered pair answers ping")

        chat = _chat_available()
        if chat:
            self.chat_round(names, label="before the crash")
        else:
            self.say("desktop_chat is not installed: skipping the chat step", kind="chat")

        victim = names[-1]
        victim_ip = lab.mesh_ip(victim)
        others = names[:-1]
        self.say(f"crashing {victim} ({victim_ip}): SIGKILL to its agent and wireguard-go", kind="fault")
        crashed_at = time.monotonic()
        lab.crash(victim)
        wait_for(lambda: not holders_of(lab.views(others), victim_ip, among=others), timeout=30,
                 what=f"{victim}'s tunnel removed everywhere")
        self.check(True, f"{', '.join(others)} removed the tunnel to {victim} "
                         f"{time.monotonic() - crashed_at:.1f} s after the crash (registrar: unreachable)")
        self.check(not lab.ping(others[0], victim), f"{others[0]} -> {victim}: ping fails, as it should")
        if chat:
            ok, why = lab.chat_send(others[0], victim, "are you there?", timeout_s=2)
            self.check(not ok, f"chat {others[0]} -> {victim} not delivered, as it should ({why or 'refused'})")
        problems = lab.mesh_problems(others)
        self.check(not problems, f"the mesh of {', '.join(others)} is complete" + (f": {problems}" if problems
                                                                                   else ""))

        self.say(f"restarting {victim} from its state dir", kind="recover")
        restarted_at = time.monotonic()
        lab.start(victim)
        self.check(lab.mesh_ip(victim) == victim_ip, f"{victim} came back with the same mesh IP {victim_ip}")
        lab.wait_mesh(names, timeout=30)
        self.check(True, f"mesh complete again, no ghost or duplicate peer "
                         f"({time.monotonic() - restarted_at:.1f} s after the restart)")
        self.say("ping matrix over mesh IPs", kind="data")
        self.check(self.ping_matrix(names), "every ordered pair answers ping")
        if chat:
            self.chat_round(names, label="after the recovery")

    def chat_round(self, names: list[str], *, label: str) -> None:
        lab = self.lab
        self.say(f"chat {label}: meshchat listen on every node, each sends to every other", kind="chat")
        listeners = {n: lab.chat_listen(n, count=len(names) - 1) for n in names}
        try:
            wait_for(lambda: all(lab.chat_listening(n) for n in names), timeout=15, what="chat listeners")
            for src in names:
                for dst in names:
                    if src != dst:
                        ok, verdict = lab.chat_send(src, dst, f"hello {dst}, this is {src}")
                        self.check(ok, f"chat {src} -> {dst}: {verdict or 'no verdict'}")
            wait_for(lambda: all(len(lab.chat_received(n)) >= len(names) - 1 for n in names), timeout=10,
                     what="chat messages received")
            for n in names:
                for msg in lab.chat_received(n):
                    self.block(f"{n} received from {msg.from_ip} ({msg.name}): {msg.text}")
        finally:
            for record in listeners.values():
                system.stop_record(record, timeout_s=3)


def run_demo(settings: LabSettings, *, keep: bool = False) -> int:
    """Run the demo in `settings.lab_dir` and remove the lab afterwards (unless `keep`). Exit status."""
    demo = Demo(settings)
    lab = demo.lab
    if lab.store.recorded_id():
        demo.say(f"removing a lab left in {lab.store.root} by an earlier run")
        lab.down()

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    status = 1
    try:
        demo.run()
        status = 0 if not demo.failures else 1
    except KeyboardInterrupt:
        demo.say("interrupted", kind="demo")
        status = 130
    except (LabError, ContractError) as exc:
        demo.say(f"demo failed: {exc}", kind="demo")
        demo.say(f"logs: {lab.store.root}/control/registrar.log, {lab.store.root}/nodes/*/agent.log")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keep and status == 0:
            demo.say(f"lab kept in {lab.store.root}: meshlab --lab-dir {lab.store.root} down", kind="demo")
        else:
            demo.say("cleaning up", kind="demo")
            lab.down()
    if demo.failures:
        demo.say(f"{len(demo.failures)} check(s) failed: {'; '.join(demo.failures)}", kind="demo")
    elif status == 0:
        demo.say("demo complete: join, full mesh, traffic, crash detection, recovery with the same IP", kind="demo")
    return status
