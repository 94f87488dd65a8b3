"""A lab's nodes: each one's namespace, underlay link, agent and echo probe, and the failures injected into them.

Failures are the ones real machines have, made with signals and link state: an agent crash (SIGKILL to the
agent only), a machine crash (every process of the node), a freeze (SIGSTOP), a partition (link down), and a
graceful stop. Nothing in the agent knows it runs in a lab.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from meshlab import system
from meshlab.context import PACKAGE_ROOT, LabContext, child_env, tail, tool
from meshlab.controlplane import ControlPlane
from meshlab.errors import LabError
from meshlab.observation import Observer
from meshlab.plan import UNDERLAY_IF, UNDERLAY_PREFIX, NodePlan, next_index
from meshlab.state import LabState, NodeRecord
from meshlab.topology import PUBLIC_PLACEMENT, Placement, parse_target, roam_target
from meshlab.traffic import PROBE_PORT
from meshlab.underlay import Underlay
from meshlab.waiting import wait_for


class Nodes:
    """Adds nodes to a lab, starts and stops their agents, and breaks them on purpose."""

    def __init__(self, ctx: LabContext, *, control: ControlPlane, observer: Observer) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.control = control
        self.observer = observer
        self.underlay = Underlay(ctx)

    def add(self, placement: Placement = PUBLIC_PLACEMENT, *, wait: bool = True) -> NodeRecord:
        """Create one more node (namespace, underlay link where `placement` says: public or behind a NAT router)
        and start its agent; returns once it has a mesh IP (at once with `wait=False`: a chaos schedule may go on
        while it joins)."""
        with self.store.locked():
            st = self.ctx.state()
            plan = self.ctx.plan(st)
            index = next_index(st.used_indices)
            node = plan.node(index)
            st.used_indices.append(index)
            record = NodeRecord(index=index, name=node.name, namespace=node.namespace, interface=node.interface,
                                underlay_ip=node.underlay_ip, node_id=f"{node.name}-{plan.lab_id}")
            st.nodes[node.name] = record
            self.store.save(st)
            system.add_namespace(node.namespace)
            self.underlay.attach(st, record, placement)
            self._start_agent(st, record, node)
            self.store.save(st)
        if wait:
            self._await_join(node.name)
        return self.ctx.node(node.name)

    def start(self, name: str, *, wait: bool = True) -> None:
        """Start a stopped, killed or crashed node's agent again (same state dir: same key, same mesh IP)."""
        with self.store.locked():
            st = self.ctx.state()
            record = self.ctx.node(name, st)
            node = self.ctx.plan(st).node(record.index)
            if record.partitioned:
                self.ctx.report(f"{name}: note: still partitioned (meshlab heal {name})")
            started = self._start_agent(st, record, node)
            self.store.save(st)
        if not started:
            self.ctx.report(f"{name}: agent already {system.record_state(record.agent)}")
        elif wait:
            self._await_join(name)

    def stop(self, name: str) -> None:
        """Graceful stop: SIGTERM the agent and wait for it to exit (it tells the registrar it is leaving)."""
        with self.store.locked():
            st = self.ctx.state()
            record = self.ctx.node(name, st)
            if system.stop_record(record.agent):
                self.ctx.report(f"{name}: agent stopped (SIGTERM)")
            else:
                self.ctx.report(f"{name}: agent was not running")
            record.agent = None
            self.store.save(st)

    def kill(self, name: str) -> None:
        """Agent crash: SIGKILL the agent only. Its wireguard-go keeps running, as after a real agent crash."""
        with self.store.locked():
            st = self.ctx.state()
            record = self.ctx.node(name, st)
            if system.signal_record(record.agent, signal.SIGKILL):
                agent = record.agent
                wait_for(lambda: system.record_state(agent) == "stopped", timeout=5, what=f"{name} agent gone")
                self.ctx.report(f"{name}: agent killed (SIGKILL); wireguard-go left running")
            else:
                self.ctx.report(f"{name}: agent was not running")
            record.agent = None
            self.store.save(st)

    def crash(self, name: str) -> None:
        """Machine crash: SIGKILL every process of the node (agent, wireguard-go, probes); its tunnel vanishes."""
        with self.store.locked():
            st = self.ctx.state()
            record = self.ctx.node(name, st)
            # A frozen process still dies of SIGKILL; nothing gets to say goodbye.
            pids = system.kill_namespace_processes(record.namespace, signal.SIGKILL)
            # A real reboot empties /var/run; here the UAPI socket of the dead wireguard-go would linger.
            system.remove_wg_sockets(record.interface)
            record.agent = None
            self.store.save(st)
        self.ctx.report(f"{name}: crashed (SIGKILL to {len(pids)} processes: agent, wireguard-go, probes)")

    def freeze(self, name: str) -> None:
        """Pause the whole node (SIGSTOP to every process in its namespace), like a suspended VM."""
        record = self.ctx.node(name)
        pids = system.kill_namespace_processes(record.namespace, signal.SIGSTOP)
        self.ctx.report(f"{name}: frozen (SIGSTOP to {len(pids)} processes)")

    def thaw(self, name: str) -> None:
        """Resume a frozen node (SIGCONT to every process in its namespace)."""
        record = self.ctx.node(name)
        pids = system.kill_namespace_processes(record.namespace, signal.SIGCONT)
        self.ctx.report(f"{name}: thawed (SIGCONT to {len(pids)} processes)")

    def partition(self, name: str) -> None:
        """Cut the node's underlay: its only link goes down, so neither broker nor peers can reach it."""
        self._set_partition(name, cut=True)

    def heal(self, name: str) -> None:
        """Restore the node's underlay link."""
        self._set_partition(name, cut=False)

    def _set_partition(self, name: str, *, cut: bool) -> None:
        with self.store.locked():
            st = self.ctx.state()
            record = self.ctx.node(name, st)
            system.set_link(record.namespace, UNDERLAY_IF, up=not cut)
            if not cut:
                # Link down drops the connected and the default route; the connected one comes back with the
                # link (the address never left), the default one does not.
                system.run(["ip", "-n", record.namespace, "addr", "replace",
                            f"{record.underlay_ip}/{UNDERLAY_PREFIX}", "dev", UNDERLAY_IF])
                self.underlay.restore_route(record)
            record.partitioned = cut
            self.store.save(st)
        self.ctx.report(f"{name}: " + ("partitioned (underlay link down)" if cut else "healed (underlay link up)"))

    def roam(self, name: str, to: str | None = None) -> NodeRecord:
        """Change the node's underlay address under its running agent (meshlab.topology.roam_target: by default a
        public node gets a new LAN address and a node behind NAT moves behind a new router of its own)."""
        with self.store.locked():
            st = self.ctx.state()
            record = self.ctx.node(name, st)
            target = roam_target(record, parse_target(st, to) if to else None)
            self.underlay.move(st, record, target)
            self.store.save(st)
        return self.ctx.node(name)

    # --- agents ----------------------------------------------------------------------------------------------

    def _agent_argv(self, st: LabState, record: NodeRecord, node: NodePlan) -> list[str]:
        node_dir = self.store.node_dir(record.name)
        argv = [
            tool("meshvpn-agent"), "run",
            # Enrolls once over HTTPS (the token's CA pin verifies the registrar), then uses the broker the
            # registrar names: the same path as on real machines, whichever broker the lab runs.
            "--registrar", self.ctx.plan(st).http_url,
            "--mesh", st.mesh,
            "--name", record.name,
            "--interface", node.interface,
            "--listen-port", str(node.listen_port),
            # No --endpoint: like a laptop, the agent derives its address from its default route (meshlab.underlay).
            "--state-dir", str(node_dir / "state"),
            "--backend", "userspace",
            "--socket", str(self.store.agent_socket(record.name)),
        ]
        if record.gateway is None:  # a node of a lab made before nodes had a default route to derive it from
            argv += ["--endpoint", f"{record.underlay_ip}:{node.listen_port}"]
        if record.node_id:
            argv += ["--node-id", record.node_id]
        if st.join_token:
            argv += ["--join-token", st.join_token]
        return argv

    def _start_agent(self, st: LabState, record: NodeRecord, node: NodePlan) -> bool:
        if system.record_state(record.agent) != "stopped":
            return False
        node_dir = self.store.node_dir(record.name)
        node_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_probe(record)
        record.agent = system.spawn(self._agent_argv(st, record, node), namespace=record.namespace,
                                    log_path=self.store.agent_log(record.name), env=child_env())
        self.ctx.report(f"{record.name}: agent started (pid {record.agent.pid})")
        return True

    def _ensure_probe(self, record: NodeRecord) -> None:
        """Start the node's TCP echo probe unless one runs in its namespace (it dies with a crash)."""
        for pid in system.namespace_pids(record.namespace):
            cmdline = _cmdline(pid)
            if "meshlab.probe" in cmdline and "serve" in cmdline:
                return
        system.spawn([sys.executable, "-m", "meshlab.probe", "serve", "--port", str(PROBE_PORT)],
                     namespace=record.namespace, log_path=self.store.node_dir(record.name) / "probe.log",
                     env=child_env(), cwd=PACKAGE_ROOT)

    def _await_join(self, name: str) -> float:
        """Wait until node `name`'s agent reports a mesh IP; record it. Returns the seconds it took."""
        record = self.ctx.node(name)
        log_path = self.store.agent_log(name)

        def joined() -> bool:
            if system.record_state(record.agent) == "stopped":
                raise LabError(f"{name}: agent exited; see {log_path}:\n{tail(log_path, 15)}")
            status = self.observer.agent_status(name)
            return status is not None and status.mesh_ip is not None

        took = wait_for(joined, timeout=self.ctx.settings.join_timeout_s, what=f"{name} joins the mesh")
        status = self.observer.agent_status(name)
        assert status is not None
        with self.store.locked():
            st = self.ctx.state()
            rec = st.node(name)
            if rec.mesh_ip and rec.mesh_ip != status.mesh_ip:
                self.ctx.report(f"{name}: mesh IP CHANGED {rec.mesh_ip} -> {status.mesh_ip}")
            rec.mesh_ip = status.mesh_ip
            rec.node_id = status.node_id
            self.store.save(st)
        self.ctx.report(f"{name}: joined as {status.mesh_ip} (node id {status.node_id}) in {took:.1f} s")
        return took


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
