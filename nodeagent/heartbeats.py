"""What the agent's heartbeats carry: members the control plane lost probed first, then our vouches and path report.

The agent's scheduler calls `beat()` every heartbeat interval, and the agent `probe_lost_soon()` when the
membership changed (on a thread of ours: a one-off APScheduler job that came due while the scheduler shut down
killed its thread with JobLookupError, a test's unhandled thread exception); nodeagent.presence runs the probes and calls back `send_vouches()` when a suspect answered, so the registrar
hears it within its vouch wait. Everything goes out through the session (`ControlSession.heartbeat`), which
sends nothing while disconnected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from nodeagent.identity import Identity
from nodeagent.meshstate import MeshState
from nodeagent.ping import Pinger
from nodeagent.presence import Presence
from nodeagent.session import ControlSession
from wgctl.errors import WireGuardError
from wgctl.model import WireGuardBackend

log = logging.getLogger(__name__)


class Heartbeats:
    """The agent's heartbeats and the probes behind them. `interval_s` is the mesh's heartbeat interval (our
    vouches stay good for about two of them); `close()` ends the probes."""

    def __init__(
        self,
        *,
        session: ControlSession,
        mesh: MeshState,
        wireguard: WireGuardBackend,
        interface: str,
        identity: Callable[[], Identity],
        pinger: Pinger,
        clock: Callable[[], float],
        fields: Callable[[], dict[str, str]],
    ) -> None:
        self._session = session
        self._mesh = mesh
        self._wireguard = wireguard
        self._interface = interface
        self._identity = identity
        self._fields = fields
        self._presence = Presence(pinger, clock=clock, send_now=self.send_vouches)
        self._name_warned: set[str] = set()
        self.interval_s = 5.0
        # probe_lost_soon: one run at a time; changes that arrive while one waits are served by it.
        self._soon = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe-lost")
        self._soon_lock = threading.Lock()
        self._soon_waiting = False
        self._closed = False

    def close(self) -> None:
        with self._soon_lock:
            self._closed = True
        self._soon.shutdown(wait=False, cancel_futures=True)
        self._presence.close()

    def probe_lost_soon(self) -> None:
        """`probe_lost()` off the caller's thread (paho's: it reads WireGuard), soon; cheap to call in bursts."""
        with self._soon_lock:
            if self._soon_waiting or self._closed:
                return
            self._soon_waiting = True
        try:
            self._soon.submit(self._probe_lost_now)
        except RuntimeError:  # closed meanwhile: nothing is probed after the agent stopped
            pass

    def _probe_lost_now(self) -> None:
        with self._soon_lock:
            self._soon_waiting = False  # a change from now on needs a run after this one
        try:
            self.probe_lost()
        except Exception:  # a probe round must never end the thread; the next heartbeat probes again
            log.exception("probing the members the control plane lost failed")

    def forget_report(self) -> None:
        """A new session: the registrar may not have our paths, so the next heartbeat carries the report."""
        self._presence.forget_report()

    def _tunnels(self) -> dict:
        try:
            return self._wireguard.read(self._interface).peers
        except WireGuardError:
            return {}

    def probe_lost(self) -> dict:
        """Probe the members the control plane lost that we hold a tunnel to; the peers as WireGuard has them."""
        self._warn_shared_name()
        peers = self._tunnels()
        self._presence.probe(self._mesh.current(), tunnelled=peers, self_id=self._identity().node_id)
        return peers

    def _warn_shared_name(self) -> None:
        """Say once per member that another node has our name: allowed (names are aliases), but confusing."""
        membership = self._mesh.current()
        if membership is None:
            return
        me = self._identity()
        for record in membership.members.values():
            if record.name == me.name and record.node_id != me.node_id and record.node_id not in self._name_warned:
                self._name_warned.add(record.node_id)
                log.warning("node %s (%s) has this node's name %r too; people see both as NAME (node id)",
                            record.node_id, record.mesh_ip, me.name, extra=self._fields())  # fmt: skip

    def _vouch_window_s(self) -> float:
        return 2 * self.interval_s + 1.0

    def beat(self) -> None:
        """One heartbeat: probe lost members again, then send with our vouches and (if due) the path report."""
        peers = self.probe_lost()
        membership = self._mesh.current()
        node_of = {r.public_key: r.node_id for r in membership.members.values()} if membership else {}
        self._session.heartbeat(alive=self._presence.vouches(within_s=self._vouch_window_s()),
                                paths=self._presence.report(peers, node_of=node_of))  # fmt: skip

    def send_vouches(self) -> None:
        """A probe of a suspect just got an answer: tell the registrar now, within its vouch wait."""
        self._session.heartbeat(alive=self._presence.vouches(within_s=self._vouch_window_s()))
