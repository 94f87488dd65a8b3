"""A lab: real registrar, broker and node agents in network namespaces, driven and observed through one object.

Every operation reads the state file, acts, and writes it back under the lab lock, so any shell (or a test
in-process) can drive a lab that another one built. The control namespace holds the underlay bridge, the
broker and the registrar; each node namespace holds one veth into that bridge, the agent, wireguard-go and
whatever test traffic runs on the node. A node behind NAT has its veth into a router namespace instead, which
masquerades it onto the bridge (meshlab.underlay). Nothing is added to the host's own network namespace.

`Lab` builds and removes the lab and hands every other call to the part whose job it is: the control plane
(meshlab.controlplane), the nodes and their failures (meshlab.nodes), observation (meshlab.observation),
traffic (meshlab.traffic), the chat (meshlab.chat) and the faults beyond a node's own processes and link
(meshlab.faults: underlay cuts and loss, registrar kill -9, reinstall), which `lab.faults` exposes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import string
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

from meshcontract.localapi import AgentStatus
from meshlab import system
from meshlab.chat import LabChat, ReceivedMessage
from meshlab.context import LabContext, Report, quiet
from meshlab.controlplane import ControlPlane
from meshlab.errors import LabError, LabStateError
from meshlab.faults import Faults
from meshlab.meshview import NodeTunnels
from meshlab.nodes import Nodes
from meshlab.observation import Observer
from meshlab.plan import MAX_NODES, LabPlan, check_lab_id
from meshlab.reachability import ReachMatrix, measure
from meshlab.report import NodeRow, RouterRow
from meshlab.settings import LabSettings
from meshlab.state import ControlRecord, LabState, NodeRecord, ProcessRecord
from meshlab.store import LabStore
from meshlab.topology import PUBLIC_PLACEMENT, Placement, layout
from meshlab.traffic import ContinuousPing, Traffic
from meshlab.underlay import remove_router_tables

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


def new_lab_id() -> str:
    """A fresh random lab id: 4 characters, starting with a letter."""
    alphabet = string.ascii_lowercase + string.digits
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(alphabet) for _ in range(3))


class Lab:
    """One lab directory and the namespaces and processes it describes."""

    def __init__(self, settings: LabSettings, *, report: Report = quiet) -> None:
        self.settings = settings
        self.store = LabStore(settings.lab_dir)
        self.report = report
        self.ctx = LabContext(settings=settings, store=self.store, report=report)
        self.control = ControlPlane(self.ctx)
        self.observer = Observer(self.ctx)
        self.nodes = Nodes(self.ctx, control=self.control, observer=self.observer)
        self.traffic = Traffic(self.ctx)
        self.chat = LabChat(self.ctx, self.traffic)
        self.faults = Faults(self.ctx, control=self.control, nodes=self.nodes)

    # --- state -------------------------------------------------------------------------------------------

    def state(self) -> LabState:
        """The current state file (LabStateError if there is no lab)."""
        return self.ctx.state()

    def plan(self, state: LabState | None = None) -> LabPlan:
        """Names and addresses of the lab (of `state`, default the state file's)."""
        return self.ctx.plan(state)

    def node(self, name: str) -> NodeRecord:
        """The record of node `name`; LabError naming the lab's nodes if there is none."""
        return self.ctx.node(name)

    def mesh_ip(self, name: str) -> str:
        """The node's mesh IP as last observed; LabError if it never joined."""
        return self.ctx.mesh_ip(name)

    # --- up / down ---------------------------------------------------------------------------------------

    def up(self, nodes: int, *, lab_id: str | None = None, nat: Sequence[str] = (),
           nat_groups: Sequence[tuple[str, Sequence[str]]] = ()) -> LabState:
        """Build the underlay, start broker and registrar, create a join token and start `nodes` agents (0: the
        control plane alone; `add` brings nodes one by one).

        Each node named in `nat` sits behind a NAT router of its own; each (name, members) of `nat_groups` puts
        its members behind one shared router; the others are public (meshlab.topology).
        """
        if nodes < 0:
            raise LabError("a lab cannot have a negative number of nodes")
        placements = layout(nodes, nat=nat, groups=nat_groups)
        longest = self.store.agent_socket(f"n{MAX_NODES}")
        if len(os.fsencode(longest.resolve())) > UNIX_PATH_MAX:
            raise LabError(f"lab directory {self.store.root} is too long: agent sockets such as {longest} "
                           f"must fit in {UNIX_PATH_MAX} bytes (a unix socket limit); use a shorter --lab-dir")
        with self.store.locked():
            if self.store.exists() or self.store.recorded_id():
                raise LabStateError(f"{self.store.root} already holds a lab; run `meshlab down` first")
            plan = LabPlan(check_lab_id(lab_id) if lab_id else new_lab_id())
            # Logs and state of a previous lab in this directory stay until the next `up`: a new lab must not
            # start from the old registrar database or node keys (different underlay, different ids).
            for leftover in ("control", "nodes", "traffic"):
                shutil.rmtree(self.store.root / leftover, ignore_errors=True)
            # Written before anything exists, so `down` can find this lab's leftovers whatever happens next.
            self.store.write_id(plan.lab_id)
            st = LabState(
                lab_id=plan.lab_id, created_at=time.time(), broker=self.settings.broker, mesh=self.settings.mesh,
                heartbeat_interval_s=self.settings.heartbeat_interval_s,
                heartbeat_ttl_s=self.settings.heartbeat_ttl_s, expiry_s=self.settings.expiry_s,
                control=ControlRecord(namespace=plan.control_ns),
            )
            self.store.save(st)
            self.report(f"lab {plan.lab_id}: underlay {plan.subnet} on bridge {plan.bridge} "
                        f"in namespace {plan.control_ns}")
            try:
                self.control.build(st, plan)
            finally:
                # Whatever was started is recorded, so `down` finds it also when the start-up failed.
                self.store.save(st)
        for placement in placements:
            self.nodes.add(placement)
        return self.state()

    def down(self, *, lab_id: str | None = None) -> list[str]:
        """Remove every namespace, process and socket of the lab. Harmless when repeated or after a crash."""
        removed: list[str] = []
        with self.store.locked():
            st: LabState | None = None
            try:
                st = self.store.load()
            except LabStateError as exc:
                if self.store.exists():
                    self.report(f"state file unreadable ({exc}); cleaning up by name prefix")
            ids = {i for i in (lab_id, st.lab_id if st else None, self.store.recorded_id()) if i}
            if st is not None:
                # Processes first, by record: one that somehow left its namespace is still found.
                records = [st.control.registrar, st.control.broker, *(n.agent for n in st.nodes.values())]
                for record in records:
                    if system.signal_record(record, signal.SIGKILL):
                        removed.append(f"pid {record.pid}")
                # Namespaces take their tables with them; the recorded ones go first by name all the same.
                removed += remove_router_tables(st)
            for one in sorted(ids):
                plan = LabPlan(one)
                for ns in system.list_namespaces():
                    if plan.owns_namespace(ns):
                        system.delete_namespace(ns)
                        removed.append(f"namespace {ns}")
                removed += [f"socket {s}" for s in system.remove_wg_sockets(plan.wg_prefix)]
            for sock in (self.store.root / "nodes").glob("*/agent.sock"):
                sock.unlink(missing_ok=True)
            self.store.forget()
        for item in removed:
            self.report(f"removed {item}")
        if not removed:
            self.report("nothing to remove")
        return removed

    # --- control plane (meshlab.controlplane) ------------------------------------------------------------

    def registrar(self, action: str) -> None:
        """stop (SIGTERM, graceful) or start the registrar. With the embedded broker this is the broker too."""
        self.control.registrar(action)

    def broker(self, action: str) -> None:
        """stop or start the broker. The embedded broker lives in the registrar process: both go together."""
        self.control.broker(action)

    def services(self) -> dict[str, str]:
        """State of the control-plane processes."""
        return self.control.services()

    # --- nodes and failures (meshlab.nodes) --------------------------------------------------------------

    def add(self, placement: Placement = PUBLIC_PLACEMENT, *, wait: bool = True) -> NodeRecord:
        """Create one more node (public, or behind NAT: meshlab.topology) and start its agent; returns once it has
        a mesh IP (at once with wait=False)."""
        return self.nodes.add(placement, wait=wait)

    def start(self, name: str, *, wait: bool = True) -> None:
        """Start a stopped, killed or crashed node's agent again (same state dir: same key, same mesh IP)."""
        self.nodes.start(name, wait=wait)

    def stop(self, name: str) -> None:
        """Graceful stop: SIGTERM the agent and wait for it to exit."""
        self.nodes.stop(name)

    def kill(self, name: str) -> None:
        """Agent crash: SIGKILL the agent only; its wireguard-go keeps running."""
        self.nodes.kill(name)

    def crash(self, name: str) -> None:
        """Machine crash: SIGKILL every process of the node; its tunnel vanishes."""
        self.nodes.crash(name)

    def freeze(self, name: str) -> None:
        """SIGSTOP every process of the node, like a suspended VM."""
        self.nodes.freeze(name)

    def thaw(self, name: str) -> None:
        """SIGCONT every process of a frozen node."""
        self.nodes.thaw(name)

    def partition(self, name: str) -> None:
        """Cut the node's only underlay link."""
        self.nodes.partition(name)

    def heal(self, name: str) -> None:
        """Restore the node's underlay link."""
        self.nodes.heal(name)

    def roam(self, name: str, to: str | None = None) -> NodeRecord:
        """Change the node's underlay address under its running agent; `to`: public, nat (a new router of its
        own) or a router / NAT group name; default: a new LAN address if public, a new router if behind NAT."""
        return self.nodes.roam(name, to)

    # --- observation (meshlab.observation) ---------------------------------------------------------------

    def agent_status(self, name: str, *, timeout: float = 2.0) -> AgentStatus | None:
        """The agent's own status over its local socket; None if it does not answer."""
        return self.observer.agent_status(name, timeout=timeout)

    def wg_peers(self, name: str) -> tuple[tuple[str, ...], ...] | None:
        """The node's WireGuard peers as wireguard-go holds them (allowed IPs); None if no interface."""
        return self.observer.wg_peers(name)

    def views(self, names: Sequence[str] | None = None) -> dict[str, NodeTunnels]:
        """The tunnels each node (default: all) holds right now."""
        return self.observer.views(names)

    def running_nodes(self) -> list[str]:
        """Nodes whose agent runs (not stopped, not frozen) and whose underlay is not cut."""
        return self.observer.running_nodes()

    def mesh_problems(self, expected: Sequence[str] | None = None) -> list[str]:
        """Why the mesh of `expected` nodes (default: running ones) is not complete; [] when it is."""
        return self.observer.mesh_problems(expected)

    def wait_mesh(self, expected: Sequence[str] | None = None, *, timeout: float = 30.0) -> float:
        """Wait until the mesh of `expected` nodes is complete; seconds taken, NotReadyError with the reasons."""
        return self.observer.wait_mesh(expected, timeout=timeout)

    def rows(self) -> list[NodeRow]:
        """One `meshlab status` row per node."""
        return self.observer.rows()

    def router_rows(self) -> list[RouterRow]:
        """One `meshlab status` row per NAT router."""
        return self.observer.router_rows()

    def masqueraded(self, router: str) -> int:
        """Connections (first packets) router `router` has masqueraded so far, from its nftables counter."""
        return self.nodes.underlay.masqueraded(router)

    # --- traffic (meshlab.traffic) and chat (meshlab.chat) -----------------------------------------------

    def exec(self, name: str, argv: Sequence[str], *, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` on node `name` (`ctl`: control namespace) with its agent in MESHVPN_SOCKET; output captured."""
        return self.traffic.exec(name, argv, timeout=timeout)

    def exec_in_place(self, name: str, argv: Sequence[str]) -> NoReturn:
        """Become `argv` run on node `name` (`meshlab exec`): signals and exit status are the command's own."""
        self.traffic.exec_in_place(name, argv)

    def ping(self, src: str, dst: str, *, count: int = 1, wait_s: float = 1.0) -> bool:
        """ICMP echo from node `src` to node `dst`'s mesh IP; True if any reply came back."""
        return self.traffic.ping(src, dst, count=count, wait_s=wait_s)

    def tcp(self, src: str, dst: str, *, timeout_s: float = 2.0) -> bool:
        """A TCP connection from `src` to `dst`'s echo probe on its mesh IP, one line echoed back."""
        return self.traffic.tcp(src, dst, timeout_s=timeout_s)

    def reachability(self, names: Sequence[str] | None = None, *, tcp: bool = True, timeout_s: float = 10.0,
                     workers: int = 8) -> ReachMatrix:
        """Ping (and TCP echo) between every ordered pair of `names` (default: running nodes) over mesh IPs, each
        pair retried until it answers or `timeout_s` passes; how long each took (meshlab.reachability)."""
        chosen = list(names) if names is not None else self.running_nodes()
        probes = {"ping": self.ping}
        if tcp:
            probes["tcp"] = self.tcp
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return measure(chosen, probes=probes, timeout_s=timeout_s, now=time.monotonic, sleep=time.sleep,
                           run_all=lambda calls: list(pool.map(lambda call: call(), calls)))

    def start_pinger(self, src: str, dst: str, *, interval_s: float = 0.2, stamped: bool = False) -> ContinuousPing:
        """Continuous ping from `src` to `dst` until `.stop()`, which returns (sent, received); `stamped`: with
        unix times and unanswered probes named, for meshview.new_losses."""
        return self.traffic.start_pinger(src, dst, interval_s=interval_s, stamped=stamped)

    def chat_listen(self, name: str, *, count: int) -> ProcessRecord:
        """Start `meshchat listen --json` on node `name`; it exits after `count` messages."""
        return self.chat.listen(name, count=count)

    def chat_listening(self, name: str) -> bool:
        """True once node `name`'s chat listener reported that it listens."""
        return self.chat.listening(name)

    def chat_received(self, name: str) -> list[ReceivedMessage]:
        """The messages node `name`'s chat listener received so far."""
        return self.chat.received(name)

    def chat_send(self, src: str, dst: str, text: str, *, timeout_s: float = 3.0) -> tuple[bool, str]:
        """`meshchat send` from `src` to `dst`'s mesh IP: (delivered, meshchat's verdict line)."""
        return self.chat.send(src, dst, text, timeout_s=timeout_s)
