"""The chat over a real mesh: `meshchat listen` / `meshchat send` inside lab nodes, talking mesh IP to mesh IP.

This is the application-level proof of the data plane: a message counts only when the other node's listener
reported it (`meshchat listen --json`) and acknowledged it. A crashed node must make sending to it fail visibly (non-zero exit, a reason),
and chat must work again once it is back with the same mesh IP. One lab per module (building it is the slow
part), embedded broker, heartbeat 1 s and TTL 3 s so a crash is noticed in seconds; every wait has a deadline.
The crash test is last: the tests before it rely on the untouched mesh.
"""

from __future__ import annotations

import pytest
from netns import lab_missing

from meshlab import system
from meshlab.chat import ReceivedMessage
from meshlab.context import tool
from meshlab.errors import LabError
from meshlab.lab import Lab, new_lab_id
from meshlab.meshview import holders_of
from meshlab.settings import LabSettings
from meshlab.waiting import wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

NODES = ["n1", "n2", "n3"]
JOIN_DEADLINE = 30.0
REMOVAL_DEADLINE = 20.0  # TTL 3 s + registrar publish + agent reconcile, with room for a loaded machine
LISTEN_DEADLINE = 15.0


def _missing() -> str | None:
    reason = lab_missing("ip", "ss", "wireguard-go", "wg", modules=("registrar.cli", "nodeagent.cli", "desktop_chat.cli"))
    if reason:
        return reason
    try:
        tool("meshchat")
    except LabError as exc:  # the console script is not installed in this environment
        return str(exc)
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = _missing()
    if reason:
        print(f"skipping the lab chat tests: {reason}")
        pytest.skip(reason)
    settings = LabSettings(lab_dir=tmp_path_factory.mktemp("chat"), broker="embedded",
                           heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0, join_timeout_s=JOIN_DEADLINE)
    lab = Lab(settings, report=lambda line: print(f"[lab] {line}"))
    lab_id = new_lab_id()
    try:
        lab.up(len(NODES), lab_id=lab_id)
        lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)
        yield lab
    finally:
        lab.down()
        assert not [ns for ns in system.list_namespaces() if ns.startswith(f"ml{lab_id}-")], "down left namespaces"


class Listener:
    """`meshchat listen` on one node for the length of a `with` block; stopped even if the test fails."""

    def __init__(self, lab: Lab, name: str, *, count: int = 100) -> None:
        self.lab = lab
        self.name = name
        self.record = lab.chat_listen(name, count=count)

    def __enter__(self) -> Listener:
        wait_for(lambda: self.lab.chat_listening(self.name), timeout=LISTEN_DEADLINE,
                 what=f"meshchat listens on {self.name}")
        return self

    def __exit__(self, *_: object) -> None:
        system.stop_record(self.record, timeout_s=3)

    def received(self) -> list[ReceivedMessage]:
        return self.lab.chat_received(self.name)

    def wait_for_message(self, src: str, text: str) -> None:
        """Wait until this listener received `text` from node `src`, seen coming from `src`'s mesh IP."""
        expected = ReceivedMessage(self.lab.mesh_ip(src), src, text)
        wait_for(lambda: expected in self.received(), timeout=10, interval=0.1,
                 what=f"{self.name} receives {expected}")


def _deliver(lab: Lab, src: str, dst: str, text: str) -> None:
    """Send `text` from `src` to `dst`; meshchat must report it delivered, naming `dst` and its mesh IP."""
    ok, verdict = lab.chat_send(src, dst, text, timeout_s=5)
    assert ok, f"chat {src} -> {dst} not delivered: {verdict}"
    assert verdict.startswith(f"delivered to {dst} ({lab.mesh_ip(dst)}) in "), verdict


def test_message_delivered_between_mesh_ips(lab):
    with Listener(lab, "n2") as n2:
        _deliver(lab, "n1", "n2", "hello n2, this is n1")
        # The listener prints the source address it saw: n1's mesh IP, i.e. the message came through the tunnel.
        n2.wait_for_message("n1", "hello n2, this is n1")
    with Listener(lab, "n1") as n1:
        _deliver(lab, "n3", "n1", "and hello n1 from n3")
        n1.wait_for_message("n3", "and hello n1 from n3")


def test_non_member_source_is_refused(lab):
    n2_ip = lab.mesh_ip("n2")
    with Listener(lab, "n2") as n2:
        # A process on n2 itself whose source is n2's underlay address: it reaches the listener (a local
        # address) but is not a mesh member, so the listener refuses it with a reason.
        underlay = lab.node("n2").underlay_ip
        proc = lab.exec("n2", [tool("meshchat"), "send", "--bind", underlay, "--to", n2_ip, "--timeout", "3",
                               "--name", "intruder", "let me in"], timeout=20)
        assert proc.returncode == 1, (proc.returncode, proc.stderr)
        assert f"{underlay} is not a current mesh member" in proc.stderr, proc.stderr
        # From n1 with its underlay address as the source the packet does enter the tunnel, but n2's
        # WireGuard drops it: n1's peer entry on n2 allows only n1's mesh IP. The sender just times out.
        n1_underlay = lab.node("n1").underlay_ip
        proc = lab.exec("n1", [tool("meshchat"), "send", "--bind", n1_underlay, "--to", n2_ip, "--timeout", "1.5",
                               "--name", "spoofer", "let me in too"], timeout=20)
        assert proc.returncode == 1, (proc.returncode, proc.stderr)
        assert f"not delivered to {n2_ip}" in proc.stderr, proc.stderr
        # A real member still gets through, and it is the only line the listener printed.
        _deliver(lab, "n3", "n2", "members only")
        n2.wait_for_message("n3", "members only")
        assert n2.received() == [ReceivedMessage(lab.mesh_ip("n3"), "n3", "members only")]


def test_crashed_peer_fails_visibly_and_chat_returns_after_restart(lab):
    n2_ip = lab.mesh_ip("n2")
    lab.crash("n2")  # agent, wireguard-go and any listener: SIGKILL
    try:
        took = wait_for(lambda: not holders_of(lab.views(["n1"]), n2_ip, among=["n1"]), timeout=REMOVAL_DEADLINE,
                        what="n1 drops its WireGuard peer for n2")
        print(f"crash -> n1 removed n2's peer in {took:.1f} s")
        ok, why = lab.chat_send("n1", "n2", "are you there?", timeout_s=2)
        assert not ok, "a message to a crashed node was reported delivered"
        assert why.startswith(f"meshchat: not delivered to {n2_ip}: "), f"no reason on stderr: {why!r}"
        print(f"send to the crashed node: {why}")
        # The rest of the mesh is untouched: n3 and n1 still chat.
        with Listener(lab, "n1") as n1:
            _deliver(lab, "n3", "n1", "n2 is gone, we are still here")
            n1.wait_for_message("n3", "n2 is gone, we are still here")
    finally:
        lab.start("n2")  # same state dir: same key, same mesh IP; waits until it has joined
    assert lab.mesh_ip("n2") == n2_ip, f"n2 came back as {lab.mesh_ip('n2')}, was {n2_ip}"
    lab.wait_mesh(NODES, timeout=JOIN_DEADLINE)
    with Listener(lab, "n2") as n2:
        _deliver(lab, "n1", "n2", "welcome back")
        n2.wait_for_message("n1", "welcome back")
    with Listener(lab, "n1") as n1:
        _deliver(lab, "n2", "n1", "glad to be back")
        n1.wait_for_message("n2", "glad to be back")
