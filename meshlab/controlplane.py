"""A lab's control plane: the underlay bridge, the broker and the registrar in the control namespace.

The registrar counts as started once its GET /healthz says `ready` (connected to the broker and subscribed),
asked from inside the control namespace where its HTTP API listens; Mosquitto once its port listens. Neither
is judged from its log text, which is for people.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Sequence

from broker.mosquitto_config import (
    ALL_LOG_TYPES,
    DynsecAuth,
    Listener,
    MosquittoConfig,
    MosquittoLogging,
    TlsFiles,
    render,
)
from meshlab import system
from meshlab.context import PACKAGE_ROOT, LabContext, child_env, tail, tool
from meshlab.errors import LabError
from meshlab.plan import BROKER_PORT, HTTP_PORT, LabPlan
from meshlab.state import LabState
from meshlab.waiting import wait_for
from registrar.admin_client import AdminClient, AdminRequestFailed
from registrar.dynsec import plugin_path
from registrar.errors import RegistrarError


def lab_mosquitto_config(plan: LabPlan, *, control_dir: str, plugin: str) -> MosquittoConfig:
    """The shipped broker settings, listening on the lab's underlay only, with the lab's files. No I/O here.

    `meshvpn-registrar mosquitto init` wrote control_dir/mosquitto/ (accounts, the registrar's certificate).
    """
    files = f"{control_dir}/mosquitto"
    return MosquittoConfig(
        listeners=(Listener(plan.control_ip, BROKER_PORT, TlsFiles(f"{files}/server.pem", f"{files}/server.key")),),
        auth=DynsecAuth(config_file=f"{files}/dynamic-security.json", plugin=plugin),
        # Started as root Mosquitto would switch to its own user, which cannot read the lab's root-owned files;
        # in the lab it keeps running as root inside its namespace.
        run_as="root",
        logging=MosquittoLogging(file=f"{control_dir}/mosquitto.log", types=ALL_LOG_TYPES, connection_messages=True),
    )


class ControlPlane:
    """Starts, stops and awaits the lab's broker and registrar; runs one-shot registrar commands."""

    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def build(self, st: LabState, plan: LabPlan) -> None:
        """Underlay bridge, broker, registrar and a reusable join token, in that order (`meshlab up`)."""
        system.add_namespace(plan.control_ns)
        system.add_bridge(plan.control_ns, plan.bridge, f"{plan.control_ip}/{plan.subnet.prefixlen}")
        self.store.control_dir.mkdir(parents=True, exist_ok=True)
        if st.broker == "mosquitto":
            self._prepare_mosquitto(st, plan)
            self._start_mosquitto(st, plan)
        self._start_registrar(st, plan)
        st.join_token = self.registrar_cli(st, ["tokens", "create", "--reusable"]).strip().splitlines()[-1]
        self.ctx.report("join token created (reusable)")

    def registrar(self, action: str) -> None:
        """stop (SIGTERM, graceful) or start the registrar. With the embedded broker this is the broker too."""
        with self.store.locked():
            st = self.ctx.state()
            if action == "stop":
                if system.stop_record(st.control.registrar):
                    self.ctx.report("registrar stopped" + (" (and its embedded broker)" if st.broker == "embedded"
                                                           else ""))
                else:
                    self.ctx.report("registrar was not running")
                st.control.registrar = None
            else:
                self._start_registrar(st, self.ctx.plan(st))
            self.store.save(st)

    def broker(self, action: str) -> None:
        """stop or start the broker. The embedded broker lives in the registrar process: both go together."""
        st = self.ctx.state()
        if st.broker == "embedded":
            self.ctx.report("embedded broker: it runs inside the registrar, so the registrar goes with it")
            self.registrar(action)
            return
        with self.store.locked():
            st = self.ctx.state()
            if action == "stop":
                self.ctx.report("mosquitto stopped" if system.stop_record(st.control.broker)
                                else "mosquitto was not running")
                st.control.broker = None
            else:
                self._start_mosquitto(st, self.ctx.plan(st))
            self.store.save(st)

    def services(self) -> dict[str, str]:
        """State of the control-plane processes."""
        st = self.ctx.state()
        out = {"lab": st.lab_id, "registrar": system.record_state(st.control.registrar)}
        if st.broker == "mosquitto":
            out["mosquitto"] = system.record_state(st.control.broker)
        else:
            out["broker"] = "embedded in registrar"
        return out

    def registrar_health(self, plan: LabPlan) -> dict | None:
        """The registrar's GET /healthz body, asked inside the control namespace; None if it does not answer."""
        argv = [sys.executable, "-m", "meshlab.healthcheck", f"{plan.http_url}/healthz", "--timeout", "2",
                "--cafile", str(self.store.control_dir / "ca.pem")]
        proc = system.run(system.ns_argv(plan.control_ns, argv), check=False, timeout=10, env=child_env(),
                          cwd=PACKAGE_ROOT)
        if proc.returncode != 0:
            return None
        try:
            body = json.loads(proc.stdout)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def kill_registrar(self) -> bool:
        """kill -9 the registrar (with the embedded broker, the broker dies with it); False if it was not running.

        Nothing gets to say goodbye: no retained offline status, no clean disconnect. `registrar("start")` undoes it.
        """
        with self.store.locked():
            st = self.ctx.state()
            record = st.control.registrar
            killed = system.signal_record(record, signal.SIGKILL)
            if killed:
                wait_for(lambda: system.record_state(record) == "stopped", timeout=5, what="registrar gone")
            st.control.registrar = None
            self.store.save(st)
        self.ctx.report("registrar killed (SIGKILL)" if killed else "registrar was not running")
        return killed

    def admin(self) -> AdminClient:
        """The running registrar's local admin API (STATE_DIR/admin.sock): its HTTP API, as the admin."""
        return AdminClient(self.store.control_dir / "admin.sock")

    def registrar_api(self, paths: Sequence[str]) -> list[object]:
        """GET each of `paths` (e.g. /v1/nodes), in order, from the registrar's API through its admin socket;
        None for a path that did not answer."""
        admin = self.admin()
        out: list[object] = []
        for path in paths:
            try:
                out.append(admin.request("GET", path))
            except RegistrarError:
                out.append(None)
        return out

    def forget_member(self, node_id: str) -> None:
        """Admin removal of a member (`meshvpn-registrar nodes remove`): tombstoned, IP quarantined, broker account
        deleted, its key revoked; the node id is free to enroll again with a new key and a join token.

        What an operator does for a machine reinstalled with a new key. LabError if the registrar did not answer.
        """
        try:
            self.admin().request("DELETE", f"/v1/nodes/{node_id}")
        except AdminRequestFailed as exc:
            if exc.status != 404:
                raise LabError(f"cannot remove member {node_id}: {exc}") from exc
        except RegistrarError as exc:
            raise LabError(f"cannot remove member {node_id}: {exc}") from exc
        self.ctx.report(f"member {node_id} removed by admin")

    def registrar_cli(self, st: LabState, args: Sequence[str]) -> str:
        """Run a one-shot registrar command against the lab's registrar state dir; its stdout."""
        env = child_env()
        env["MESHVPN_STATE_DIR"] = str(self.store.control_dir)
        env["MESHVPN_MESH"] = st.mesh
        proc = system.run([tool("meshvpn-registrar"), *args], env=env)
        return proc.stdout

    # --- registrar -------------------------------------------------------------------------------------------

    def _registrar_argv(self, st: LabState, plan: LabPlan) -> list[str]:
        argv = [
            tool("meshvpn-registrar"), "run",
            "--http", f"{plan.control_ip}:{HTTP_PORT}",
            "--state-dir", str(self.store.control_dir),
            "--mesh", st.mesh,
            "--heartbeat-interval", str(st.heartbeat_interval_s),
            "--heartbeat-ttl", str(st.heartbeat_ttl_s),
            *(["--expiry", str(st.expiry_s)] if st.expiry_s is not None else []),
            # First name in the certificate and the host nodes are told to use (broker URL, join command).
            "--tls-name", plan.control_ip,
        ]
        if st.broker == "embedded":
            argv += ["--embedded-broker", "--broker-listen", f"{plan.control_ip}:{BROKER_PORT}"]
        else:
            argv += ["--broker", plan.broker_url]
        return argv

    def _registrar_env(self, st: LabState) -> dict[str, str]:
        # With Mosquitto the registrar reads its broker passwords from its state directory (mosquitto init).
        return child_env()

    def _start_registrar(self, st: LabState, plan: LabPlan) -> None:
        if system.record_state(st.control.registrar) != "stopped":
            return
        log_path = self.store.control_dir / "registrar.log"
        self.ctx.report("starting registrar" + (" with embedded broker" if st.broker == "embedded" else ""))
        record = system.spawn(self._registrar_argv(st, plan), namespace=plan.control_ns, log_path=log_path,
                              env=self._registrar_env(st))
        st.control.registrar = record

        def ready() -> bool:
            if system.record_state(record) == "stopped":
                raise LabError(f"registrar exited during start-up; see {log_path}:\n{tail(log_path, 15)}")
            health = self.registrar_health(plan)
            return health is not None and health.get("ready") is True

        took = wait_for(ready, timeout=self.ctx.settings.start_timeout_s, what="registrar ready (GET /healthz)")
        self.ctx.report(f"registrar ready in {took:.1f} s (pid {record.pid}, broker {plan.broker_url}, "
                        f"http {plan.http_url})")

    # --- mosquitto -------------------------------------------------------------------------------------------

    def _prepare_mosquitto(self, st: LabState, plan: LabPlan) -> None:
        """Accounts and TLS files for Mosquitto (`meshvpn-registrar mosquitto init`), then mosquitto.conf."""
        control = self.store.control_dir
        plugin = plugin_path()
        if plugin is None:
            raise LabError("Mosquitto's dynamic security plugin is not installed (apt-get install mosquitto)")
        self.registrar_cli(st, ["mosquitto", "init", "--dir", str(control / "mosquitto"), "--force",
                                "--state-dir", str(control), "--tls-name", plan.control_ip])  # fmt: skip
        config = lab_mosquitto_config(plan, control_dir=str(control), plugin=plugin)
        (control / "mosquitto.conf").write_text(render(config))

    def _start_mosquitto(self, st: LabState, plan: LabPlan) -> None:
        if system.record_state(st.control.broker) != "stopped":
            return
        log_path = self.store.control_dir / "mosquitto.stdout.log"
        self.ctx.report("starting mosquitto")
        record = system.spawn([shutil.which("mosquitto") or "mosquitto", "-c",
                               str(self.store.control_dir / "mosquitto.conf")],
                              namespace=plan.control_ns, log_path=log_path, env=child_env())
        st.control.broker = record
        (self.store.control_dir / "mosquitto.pid").write_text(f"{record.pid}\n")

        def listening() -> bool:
            if system.record_state(record) == "stopped":
                raise LabError(f"mosquitto exited during start-up; see {log_path}:\n{tail(log_path, 15)}")
            return system.listening(plan.control_ns, BROKER_PORT)

        wait_for(listening, timeout=self.ctx.settings.start_timeout_s, what="mosquitto listening")
        self.ctx.report(f"mosquitto running (pid {record.pid}) on {plan.broker_url}")
