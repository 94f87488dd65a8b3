"""A lab: real registrar, broker and node agents in network namespaces, and the failures we inject into them.

Every operation reads the state file, acts, and writes it back under the lab lock, so any shell (or a test
in-process) can drive a lab that another one built. The control namespace holds the underlay bridge, the
broker and the registrar; each node namespace holds one veth into that bridge, the agent, wireguard-go and
whatever test traffic runs on the node. Nothing is added to the host's own network namespace.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from meshcontract.errors import ContractError
from meshcontract.localapi import AgentStatus, LocalRequest, query
from meshlab import system
from meshlab.errors import CommandError, LabError, LabStateError, NotReadyError
from meshlab.meshview import NodeView, mesh_problems, parse_ping_summary, parse_wg_allowed_ips
from meshlab.plan import (
    BROKER_PORT,
    HTTP_PORT,
    MAX_NODES,
    UNDERLAY_IF,
    LabPlan,
    NodePlan,
    check_lab_id,
    next_index,
    node_index,
)
from meshlab.report import NodeRow
from meshlab.settings import LabSettings
from meshlab.state import ControlRecord, LabState, NodeRecord, ProcessRecord
from meshlab.store import LabStore

log = logging.getLogger(__name__)

Report = Callable[[str], None]
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
PROBE_PORT = 7901  # the TCP echo probe every node runs (meshlab.probe)
REPO_ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO_ACL = REPO_ROOT / "broker" / "mosquitto" / "acl.conf"


def _quiet(_: str) -> None:
    pass


def new_lab_id() -> str:
    """A fresh random lab id: 4 characters, starting with a letter."""
    alphabet = string.ascii_lowercase + string.digits
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(alphabet) for _ in range(3))


def tool(name: str) -> str:
    """Path of a meshvpn console script: next to this Python first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name} not found next to {sys.executable} or on PATH (run scripts/bootstrap)")
    return found


def child_env() -> dict[str, str]:
    """Environment for the lab's services: ours without MESHVPN_* (the lab passes flags), plus wireguard-go's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHVPN_")}
    env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # Debugging a lab run: MESHLAB_LOG_LEVEL=DEBUG reaches every service the lab starts.
    if os.environ.get("MESHLAB_LOG_LEVEL"):
        env["MESHVPN_LOG_LEVEL"] = os.environ["MESHLAB_LOG_LEVEL"]
    return env


def wait_for(what: str, check: Callable[[], bool], *, timeout: float, interval: float = 0.2) -> float:
    """Poll `check` until it is true; return the seconds it took, NotReadyError naming `what` at the deadline."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise NotReadyError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)


class Lab:
    """One lab directory and the namespaces and processes it describes."""

    def __init__(self, settings: LabSettings, *, report: Report = _quiet) -> None:
        self.settings = settings
        self.store = LabStore(settings.lab_dir)
        self.report = report

    # --- state -------------------------------------------------------------------------------------------

    def state(self) -> LabState:
        """The current state file (LabStateError if there is no lab)."""
        return self.store.load()

    def plan(self, state: LabState | None = None) -> LabPlan:
        return LabPlan((state or self.state()).lab_id)

    def node(self, name: str) -> NodeRecord:
        """The record of node `name`; LabError naming the lab's nodes if there is none."""
        return self._node(self.state(), name)

    def _node(self, state: LabState, name: str) -> NodeRecord:
        try:
            return state.node(name)
        except KeyError:
            names = ", ".join(n.name for n in state.ordered_nodes()) or "none"
            raise LabError(f"no node {name!r} in this lab (nodes: {names})") from None

    # --- up / down ---------------------------------------------------------------------------------------

    def up(self, nodes: int, *, lab_id: str | None = None) -> LabState:
        """Build the underlay, start broker and registrar, create a join token and start `nodes` agents."""
        if nodes < 1:
            raise LabError("a lab needs at least one node")
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
                heartbeat_ttl_s=self.settings.heartbeat_ttl_s,
                control=ControlRecord(namespace=plan.control_ns),
            )
            self.store.save(st)
            self.report(f"lab {plan.lab_id}: underlay {plan.subnet} on bridge {plan.bridge} "
                        f"in namespace {plan.control_ns}")
            system.add_namespace(plan.control_ns)
            system.add_bridge(plan.control_ns, plan.bridge, f"{plan.control_ip}/{plan.subnet.prefixlen}")
            self.store.control_dir.mkdir(parents=True, exist_ok=True)
            if st.broker == "mosquitto":
                self._prepare_mosquitto(st, plan)
                self._start_mosquitto(st, plan)
            self._start_registrar(st, plan)
            st.join_token = self._registrar_cli(st, ["tokens", "create", "--reusable"]).strip().splitlines()[-1]
            self.report("join token created (reusable)")
            self.store.save(st)
        for _ in range(nodes):
            self.add()
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

    # --- control plane -----------------------------------------------------------------------------------

    def _registrar_argv(self, st: LabState, plan: LabPlan) -> list[str]:
        argv = [
            tool("meshvpn-registrar"), "run",
            "--http", f"{plan.control_ip}:{HTTP_PORT}",
            "--state-dir", str(self.store.control_dir),
            "--mesh", st.mesh,
            "--heartbeat-interval", str(st.heartbeat_interval_s),
            "--heartbeat-ttl", str(st.heartbeat_ttl_s),
        ]
        if st.broker == "embedded":
            argv += ["--embedded-broker", "--broker-listen", f"{plan.control_ip}:{BROKER_PORT}"]
        else:
            argv += ["--broker", plan.broker_url]
        return argv

    def _registrar_env(self, st: LabState) -> dict[str, str]:
        env = child_env()
        if st.broker == "mosquitto":
            env["MESHVPN_BROKER__USERNAME"] = "registrar"
            env["MESHVPN_BROKER__PASSWORD"] = (self.store.control_dir / "registrar.password").read_text().strip()
            env["MESHVPN_BROKER_RELOAD_COMMAND"] = self._mosquitto_reload_command()
        return env

    def _mosquitto_reload_command(self) -> str:
        # Mosquitto re-reads its password file on SIGHUP. The pid file is rewritten on every broker start, so
        # the registrar's command stays right across `meshlab broker stop|start`.
        pid_file = self.store.control_dir / "mosquitto.pid"
        return f"sh -c 'kill -HUP \"$(cat {pid_file})\"'"

    def _registrar_cli(self, st: LabState, args: Sequence[str]) -> str:
        """Run a one-shot registrar command against the lab's registrar state dir; its stdout."""
        env = child_env()
        env["MESHVPN_STATE_DIR"] = str(self.store.control_dir)
        env["MESHVPN_MESH"] = st.mesh
        if st.broker == "mosquitto" and (self.store.control_dir / "mosquitto.pid").exists():
            env["MESHVPN_BROKER_RELOAD_COMMAND"] = self._mosquitto_reload_command()
        proc = system.run([tool("meshvpn-registrar"), *args], env=env)
        return proc.stdout

    def _start_registrar(self, st: LabState, plan: LabPlan) -> None:
        if system.record_state(st.control.registrar) != "stopped":
            return
        log_path = self.store.control_dir / "registrar.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        self.report("starting registrar" + (" with embedded broker" if st.broker == "embedded" else ""))
        record = system.spawn(self._registrar_argv(st, plan), namespace=plan.control_ns, log_path=log_path,
                              env=self._registrar_env(st))
        st.control.registrar = record

        def ready() -> bool:
            if system.record_state(record) == "stopped":
                raise LabError(f"registrar exited during start-up; see {log_path}:\n{_tail(log_path, 15)}")
            return "registrar ready" in _read_from(log_path, offset)

        took = wait_for("registrar ready", ready, timeout=self.settings.start_timeout_s)
        self.report(f"registrar ready in {took:.1f} s (pid {record.pid}, broker {plan.broker_url}, "
                    f"http {plan.http_url})")

    def _prepare_mosquitto(self, st: LabState, plan: LabPlan) -> None:
        """Write mosquitto.conf and issue the registrar's broker credentials into the shared password file."""
        control = self.store.control_dir
        password = self._registrar_cli(st, ["credentials", "issue", "registrar"]).strip().splitlines()[-1]
        (control / "registrar.password").write_text(password + "\n")
        (control / "registrar.password").chmod(0o600)
        conf = "\n".join([
            "# Written by meshlab: the shipped broker/mosquitto settings, listening on the lab's underlay only.",
            "per_listener_settings false",
            # Started as root Mosquitto would switch to its own user, which cannot read the root-owned 0600
            # password file the registrar rewrites; in the lab it keeps running as root inside its namespace.
            "user root",
            f"listener {BROKER_PORT} {plan.control_ip}",
            "allow_anonymous false",
            f"password_file {control / 'passwords'}",
            f"acl_file {MOSQUITTO_ACL}",
            "use_username_as_clientid true",
            "set_tcp_nodelay true",
            "persistence false",
            f"log_dest file {control / 'mosquitto.log'}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            "",
        ])
        (control / "mosquitto.conf").write_text(conf)

    def _start_mosquitto(self, st: LabState, plan: LabPlan) -> None:
        if system.record_state(st.control.broker) != "stopped":
            return
        log_path = self.store.control_dir / "mosquitto.stdout.log"
        self.report("starting mosquitto")
        record = system.spawn([shutil.which("mosquitto") or "mosquitto", "-c",
                               str(self.store.control_dir / "mosquitto.conf")],
                              namespace=plan.control_ns, log_path=log_path, env=child_env())
        st.control.broker = record
        (self.store.control_dir / "mosquitto.pid").write_text(f"{record.pid}\n")

        def ready() -> bool:
            if system.record_state(record) == "stopped":
                raise LabError(f"mosquitto exited during start-up; see {log_path}:\n{_tail(log_path, 15)}")
            return system.listening(plan.control_ns, BROKER_PORT)

        wait_for("mosquitto listening", ready, timeout=self.settings.start_timeout_s)
        self.report(f"mosquitto running (pid {record.pid}) on {plan.broker_url}")

    def registrar(self, action: str) -> None:
        """stop (SIGTERM, graceful) or start the registrar. With the embedded broker this is the broker too."""
        with self.store.locked():
            st = self.state()
            if action == "stop":
                if system.stop_record(st.control.registrar):
                    self.report("registrar stopped" + (" (and its embedded broker)" if st.broker == "embedded"
                                                       else ""))
                else:
                    self.report("registrar was not running")
                st.control.registrar = None
            else:
                self._start_registrar(st, self.plan(st))
            self.store.save(st)

    def broker(self, action: str) -> None:
        """stop or start the broker. The embedded broker lives in the registrar process: both go together."""
        st = self.state()
        if st.broker == "embedded":
            self.report("embedded broker: it runs inside the registrar, so the registrar goes with it")
            self.registrar(action)
            return
        with self.store.locked():
            st = self.state()
            if action == "stop":
                self.report("mosquitto stopped" if system.stop_record(st.control.broker)
                            else "mosquitto was not running")
                st.control.broker = None
            else:
                self._start_mosquitto(st, self.plan(st))
            self.store.save(st)

    # --- nodes -------------------------------------------------------------------------------------------

    def add(self) -> NodeRecord:
        """Create one more node (namespace, underlay link) and start its agent; returns once it has a mesh IP."""
        with self.store.locked():
            st = self.state()
            plan = self.plan(st)
            index = next_index(st.used_indices)
            node = plan.node(index)
            st.used_indices.append(index)
            record = NodeRecord(index=index, name=node.name, namespace=node.namespace, interface=node.interface,
                                underlay_ip=node.underlay_ip, node_id=f"{node.name}-{plan.lab_id}")
            st.nodes[node.name] = record
            self.store.save(st)
            system.add_namespace(node.namespace)
            system.add_node_link(node_ns=node.namespace, ifname=UNDERLAY_IF,
                                 address=f"{node.underlay_ip}/{node.underlay_prefix}",
                                 bridge_ns=plan.control_ns, bridge=plan.bridge, port=node.bridge_port)
            self.report(f"{node.name}: namespace {node.namespace}, underlay {node.underlay_ip}, "
                        f"interface {node.interface}")
            if st.broker == "mosquitto":
                self._provision_node(st, record)
            self._start_agent(st, record, node)
            self.store.save(st)
        self._await_join(node.name)
        return self.state().node(node.name)

    def _provision_node(self, st: LabState, record: NodeRecord) -> None:
        """Mosquitto cannot check join tokens: issue the node's broker password before its first start."""
        state_dir = self.store.node_dir(record.name) / "state"
        password_file = state_dir / "broker_password"
        if password_file.exists():
            return
        assert record.node_id is not None
        password = self._registrar_cli(st, ["credentials", "issue", record.node_id]).strip().splitlines()[-1]
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(0o700)
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        (state_dir / "node_id").write_text(record.node_id + "\n")

    def _agent_argv(self, st: LabState, record: NodeRecord, node: NodePlan) -> list[str]:
        plan = self.plan(st)
        node_dir = self.store.node_dir(record.name)
        argv = [
            tool("meshvpn-agent"), "run",
            "--broker", plan.broker_url,
            "--mesh", st.mesh,
            "--name", record.name,
            "--interface", node.interface,
            "--listen-port", str(node.listen_port),
            "--endpoint", node.endpoint,
            "--state-dir", str(node_dir / "state"),
            "--backend", "userspace",
            "--socket", str(node_dir / "agent.sock"),
        ]
        if record.node_id:
            argv += ["--node-id", record.node_id]
        if st.join_token:
            # With Mosquitto the node logs in with its provisioned password; the token still admits it.
            argv += ["--join-token", st.join_token]
        return argv

    def _start_agent(self, st: LabState, record: NodeRecord, node: NodePlan) -> bool:
        if system.record_state(record.agent) != "stopped":
            return False
        node_dir = self.store.node_dir(record.name)
        node_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_probe(record)
        record.agent = system.spawn(self._agent_argv(st, record, node), namespace=record.namespace,
                                    log_path=node_dir / "agent.log", env=child_env())
        self.report(f"{record.name}: agent started (pid {record.agent.pid})")
        return True

    def _ensure_probe(self, record: NodeRecord) -> None:
        """Start the node's TCP echo probe unless one runs in its namespace (it dies with a crash)."""
        for pid in system.namespace_pids(record.namespace):
            cmdline = _cmdline(pid)
            if "meshlab.probe" in cmdline and "serve" in cmdline:
                return
        system.spawn([sys.executable, "-m", "meshlab.probe", "serve", "--port", str(PROBE_PORT)],
                     namespace=record.namespace, log_path=self.store.node_dir(record.name) / "probe.log",
                     env=child_env(), cwd=REPO_ROOT)

    def _await_join(self, name: str) -> float:
        """Wait until node `name`'s agent reports a mesh IP; record it. Returns the seconds it took."""
        st = self.state()
        record = self._node(st, name)

        def joined() -> bool:
            if system.record_state(record.agent) == "stopped":
                raise LabError(f"{name}: agent exited; see {self.store.agent_log(name)}:\n"
                               f"{_tail(self.store.agent_log(name), 15)}")
            status = self.agent_status(name)
            return status is not None and status.mesh_ip is not None

        took = wait_for(f"{name} joins the mesh", joined, timeout=self.settings.join_timeout_s)
        status = self.agent_status(name)
        assert status is not None
        with self.store.locked():
            st = self.state()
            rec = st.node(name)
            if rec.mesh_ip and rec.mesh_ip != status.mesh_ip:
                self.report(f"{name}: mesh IP CHANGED {rec.mesh_ip} -> {status.mesh_ip}")
            rec.mesh_ip = status.mesh_ip
            rec.node_id = status.node_id
            self.store.save(st)
        self.report(f"{name}: joined as {status.mesh_ip} (node id {status.node_id}) in {took:.1f} s")
        return took

    def start(self, name: str, *, wait: bool = True) -> None:
        """Start a stopped, killed or crashed node's agent again (same state dir: same key, same mesh IP)."""
        with self.store.locked():
            st = self.state()
            record = self._node(st, name)
            node = self.plan(st).node(record.index)
            if record.partitioned:
                self.report(f"{name}: note: still partitioned (meshlab heal {name})")
            started = self._start_agent(st, record, node)
            self.store.save(st)
        if not started:
            self.report(f"{name}: agent already {system.record_state(record.agent)}")
        elif wait:
            self._await_join(name)

    def stop(self, name: str) -> None:
        """Graceful stop: SIGTERM the agent and wait for it to exit (it tells the registrar it is leaving)."""
        with self.store.locked():
            st = self.state()
            record = self._node(st, name)
            if system.stop_record(record.agent):
                self.report(f"{name}: agent stopped (SIGTERM)")
            else:
                self.report(f"{name}: agent was not running")
            record.agent = None
            self.store.save(st)

    def kill(self, name: str) -> None:
        """Agent crash: SIGKILL the agent only. Its wireguard-go keeps running, as after a real agent crash."""
        with self.store.locked():
            st = self.state()
            record = self._node(st, name)
            if system.signal_record(record.agent, signal.SIGKILL):
                wait_for(f"{name} agent gone", lambda: system.record_state(record.agent) == "stopped", timeout=5)
                self.report(f"{name}: agent killed (SIGKILL); wireguard-go left running")
            else:
                self.report(f"{name}: agent was not running")
            record.agent = None
            self.store.save(st)

    def crash(self, name: str) -> None:
        """Machine crash: SIGKILL every process of the node (agent, wireguard-go, probes); its tunnel vanishes."""
        with self.store.locked():
            st = self.state()
            record = self._node(st, name)
            # A frozen process still dies of SIGKILL; nothing gets to say goodbye.
            pids = system.kill_namespace_processes(record.namespace, signal.SIGKILL)
            # A real reboot empties /var/run; here the UAPI socket of the dead wireguard-go would linger.
            system.remove_wg_sockets(record.interface)
            record.agent = None
            self.store.save(st)
        self.report(f"{name}: crashed (SIGKILL to {len(pids)} processes: agent, wireguard-go, probes)")

    def freeze(self, name: str) -> None:
        """Pause the whole node (SIGSTOP to every process in its namespace), like a suspended VM."""
        st = self.state()
        record = self._node(st, name)
        pids = system.kill_namespace_processes(record.namespace, signal.SIGSTOP)
        self.report(f"{name}: frozen (SIGSTOP to {len(pids)} processes)")

    def thaw(self, name: str) -> None:
        """Resume a frozen node (SIGCONT to every process in its namespace)."""
        st = self.state()
        record = self._node(st, name)
        pids = system.kill_namespace_processes(record.namespace, signal.SIGCONT)
        self.report(f"{name}: thawed (SIGCONT to {len(pids)} processes)")

    def partition(self, name: str) -> None:
        """Cut the node's underlay: its only link goes down, so neither broker nor peers can reach it."""
        self._set_partition(name, cut=True)

    def heal(self, name: str) -> None:
        """Restore the node's underlay link."""
        self._set_partition(name, cut=False)

    def _set_partition(self, name: str, *, cut: bool) -> None:
        with self.store.locked():
            st = self.state()
            record = self._node(st, name)
            system.set_link(record.namespace, UNDERLAY_IF, up=not cut)
            if not cut:
                # Link down drops the connected route; it comes back with the link, the address never left.
                system.run(["ip", "-n", record.namespace, "addr", "replace",
                            f"{record.underlay_ip}/{self.plan(st).subnet.prefixlen}", "dev", UNDERLAY_IF])
            record.partitioned = cut
            self.store.save(st)
        self.report(f"{name}: " + ("partitioned (underlay link down)" if cut else "healed (underlay link up)"))

    # --- observation -------------------------------------------------------------------------------------

    def agent_status(self, name: str, *, timeout: float = 2.0) -> AgentStatus | None:
        """The agent's own status over its local socket; None if it does not answer (stopped, frozen)."""
        sock = self.store.agent_socket(name)
        if not sock.exists():
            return None
        try:
            response = query(LocalRequest(op="status"), socket_path=str(sock), timeout=timeout)
        except ContractError:
            return None
        return response.status if response.ok else None

    def wg_peers(self, name: str) -> tuple[tuple[str, ...], ...] | None:
        """The node's WireGuard peers as wireguard-go really holds them (allowed IPs); None if no interface."""
        st = self.state()
        record = self._node(st, name)
        proc = system.run(system.ns_argv(record.namespace, ["wg", "show", record.interface, "allowed-ips"]),
                          check=False, timeout=5)
        if proc.returncode != 0:
            return None
        return parse_wg_allowed_ips(proc.stdout)

    def views(self, names: Sequence[str] | None = None) -> dict[str, NodeView]:
        """What each node (default: all) holds right now: its mesh IP (from the state file) and WireGuard peers."""
        st = self.state()
        out = {}
        for record in st.ordered_nodes():
            if names is not None and record.name not in names:
                continue
            out[record.name] = NodeView(record.name, record.mesh_ip, self.wg_peers(record.name) or ())
        return out

    def running_nodes(self) -> list[str]:
        """Nodes whose agent runs (not stopped, not frozen) and whose underlay is not cut."""
        st = self.state()
        return [n.name for n in st.ordered_nodes()
                if system.record_state(n.agent) == "running" and not n.partitioned]

    def mesh_problems(self, expected: Sequence[str] | None = None) -> list[str]:
        """Why the mesh of `expected` nodes (default: running ones) is not complete; [] when it is."""
        names = list(expected) if expected is not None else self.running_nodes()
        return mesh_problems(self.views(names), names)

    def wait_mesh(self, expected: Sequence[str] | None = None, *, timeout: float = 30.0) -> float:
        """Wait until the mesh of `expected` nodes is complete; seconds taken, NotReadyError with the reasons."""
        last: list[str] = []

        def complete() -> bool:
            nonlocal last
            last = self.mesh_problems(expected)
            return not last

        try:
            return wait_for("mesh complete", complete, timeout=timeout, interval=0.25)
        except NotReadyError as exc:
            raise NotReadyError(f"{exc}: {'; '.join(last)}") from None

    def rows(self) -> list[NodeRow]:
        """One status row per node, from the state file, the process table and the agent's local API."""
        st = self.state()
        rows = []
        names_by_ip = {n.mesh_ip: n.name for n in st.nodes.values() if n.mesh_ip}
        for record in st.ordered_nodes():
            agent = system.record_state(record.agent)
            row = NodeRow(name=record.name, agent=agent, mesh_ip=record.mesh_ip, node_id=record.node_id,
                          underlay_ip=record.underlay_ip, partitioned=record.partitioned)
            status = self.agent_status(record.name, timeout=1.0) if agent == "running" else None
            if status is not None:
                row = NodeRow(
                    name=record.name, agent=agent, mesh_ip=status.mesh_ip, node_id=status.node_id,
                    underlay_ip=record.underlay_ip, partitioned=record.partitioned,
                    peers_configured=sum(1 for p in status.peers if p.configured), peers_known=len(status.peers),
                    handshakes={
                        names_by_ip.get(p.mesh_ip, p.name): (None if p.latest_handshake is None
                                                             else max(0.0, status.now - p.latest_handshake))
                        for p in status.peers if p.configured
                    },
                )
            elif agent == "running":
                row = NodeRow(name=record.name, agent=agent, mesh_ip=record.mesh_ip, node_id=record.node_id,
                              underlay_ip=record.underlay_ip, partitioned=record.partitioned,
                              error="agent not answering on its socket")
            rows.append(row)
        return rows

    def services(self) -> dict[str, str]:
        """State of the control-plane processes."""
        st = self.state()
        out = {"lab": st.lab_id, "registrar": system.record_state(st.control.registrar)}
        if st.broker == "mosquitto":
            out["mosquitto"] = system.record_state(st.control.broker)
        else:
            out["broker"] = "embedded in registrar"
        return out

    # --- traffic -----------------------------------------------------------------------------------------

    def exec(self, name: str, argv: Sequence[str], *, capture: bool = True,
             timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside node `name`'s namespace (`ctl` for the control namespace)."""
        st = self.state()
        namespace = st.control.namespace if name == "ctl" else self._node(st, name).namespace
        full = system.ns_argv(namespace, argv)
        try:
            return subprocess.run(full, capture_output=capture, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandError(f"{' '.join(full)}: {exc}") from exc

    def mesh_ip(self, name: str) -> str:
        """The node's mesh IP as last observed; LabError if it never joined."""
        record = self._node(self.state(), name)
        if record.mesh_ip is None:
            raise LabError(f"{name} has no mesh IP yet")
        return record.mesh_ip

    def ping(self, src: str, dst: str, *, count: int = 1, wait_s: float = 1.0) -> bool:
        """One ICMP echo (or `count`) from node `src` to node `dst`'s mesh IP; True if any reply came back."""
        proc = self.exec(src, ["ping", "-n", "-q", "-c", str(count), "-W", str(wait_s), self.mesh_ip(dst)],
                         timeout=count * wait_s + 5)
        return proc.returncode == 0

    def tcp(self, src: str, dst: str, *, timeout_s: float = 2.0) -> bool:
        """A TCP connection from `src` to `dst`'s echo probe on its mesh IP, with one line echoed back."""
        proc = self.exec(src, [sys.executable, "-m", "meshlab.probe", "connect", self.mesh_ip(dst),
                               str(PROBE_PORT), "--timeout", str(timeout_s)], timeout=timeout_s + 10)
        return proc.returncode == 0

    def start_pinger(self, src: str, dst: str, *, interval_s: float = 0.2) -> Pinger:
        """Continuous ping from `src` to `dst` until `.stop()`; the result counts sent and received."""
        st = self.state()
        log_path = self.store.root / "traffic" / f"ping-{src}-{dst}-{int(time.time() * 1000)}.log"
        record = system.spawn(["ping", "-n", "-i", str(interval_s), "-W", "1", self.mesh_ip(dst)],
                              namespace=self._node(st, src).namespace, log_path=log_path, env=child_env())
        return Pinger(record)


    # --- chat (desktop_chat's headless mode) -------------------------------------------------------------

    def chat_listen(self, name: str, *, count: int) -> ProcessRecord:
        """Start `meshchat listen` on node `name` (on its mesh IP, from its agent); exits after `count` messages."""
        st = self.state()
        record = self._node(st, name)
        log_path = self.store.node_dir(name) / "chat.log"
        log_path.unlink(missing_ok=True)
        return system.spawn([tool("meshchat"), "listen", "--socket", str(self.store.agent_socket(name)),
                             "--name", name, "--count", str(count)],
                            namespace=record.namespace, log_path=log_path, env=child_env())

    def chat_listening(self, name: str) -> bool:
        """True once node `name`'s chat listener says it listens."""
        return "listening on" in _read_from(self.store.node_dir(name) / "chat.log", 0)

    def chat_received(self, name: str) -> list[str]:
        """Messages node `name`'s chat listener printed (one per line: `<ip> <name>: <text>`)."""
        text = _read_from(self.store.node_dir(name) / "chat.log", 0)
        return [line for line in text.splitlines() if line and not line.startswith("meshchat:")
                and ": " in line and line.split(" ", 1)[0].count(".") == 3]

    def chat_send(self, src: str, dst: str, text: str, *, timeout_s: float = 3.0) -> tuple[bool, str]:
        """`meshchat send` from `src` to `dst`'s mesh IP; (delivered, stderr)."""
        proc = self.exec(src, [tool("meshchat"), "send", "--socket", str(self.store.agent_socket(src)),
                               "--name", src, "--to", self.mesh_ip(dst), "--timeout", str(timeout_s), text],
                         timeout=timeout_s + 15)
        # meshchat logs a warning and then prints its verdict: the verdict (last line) is the reason.
        lines = (proc.stderr or "").strip().splitlines()
        return proc.returncode == 0, (lines[-1] if lines else "")


class Pinger:
    """A running `ping`; `stop()` ends it with SIGINT and returns (sent, received) from its summary."""

    def __init__(self, record: ProcessRecord) -> None:
        self.record = record

    def stop(self) -> tuple[int, int]:
        system.signal_record(self.record, signal.SIGINT)
        wait_for("ping summary", lambda: system.record_state(self.record) == "stopped", timeout=5, interval=0.05)
        return parse_ping_summary(Path(self.record.log).read_text())


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


__all__ = ["Lab", "Pinger", "node_index", "new_lab_id", "wait_for"]
