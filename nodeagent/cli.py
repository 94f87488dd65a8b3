"""`meshvpn-agent`: the composition root of the node daemon. Loads settings once, builds the backends, runs.

Exit status: 0 after a graceful stop, 1 for a configuration or start-up error, 3 when the registrar refused
the join (bad, expired or used join token, revoked or conflicting key, a registrar whose CA does not match the
token's pin), 4 when this node's identity is gone (removed, revoked, expired: the enrollment is forgotten). A
refused join leaves nothing behind: enrolling happens before anything is created.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from meshcontract import logs
from meshcontract.completion import add_completion_options
from meshcontract.errors import ContractError
from meshcontract.settings import load_settings
from meshcontract.stopping import StopSignals
from nodeagent.agent import Agent
from nodeagent.errors import AgentError, EnrollmentRefused
from nodeagent.settings import AgentSettings
from wgctl.errors import WireGuardError
from wgctl.model import RouteBackend, WireGuardBackend

log = logging.getLogger("nodeagent")

EXIT_CONFIG = 1
EXIT_REFUSED = 3

EPILOG = """\
examples:
  meshvpn-agent --registrar https://ctl.example.org:8443 --join-token mvj_...   # join (once), then run
  meshvpn-agent --config /etc/meshvpn/agent.toml                                # as the systemd unit runs it
  meshvpn-agent --endpoint 203.0.113.7:51820 ...                                # advertise a public address

exit status: 0 stopped, 1 configuration or start-up error, 3 the registrar refused the join (a bad, used or
expired join token, a revoked or conflicting key, a CA that is not the token's pin: see the message), 4 this
node's identity is gone (removed, revoked, or away longer than its reservation: enroll again with a new join
token). Anything that can heal by itself is retried, never an exit; the systemd unit does not restart on 3 or 4.
"""


def build_backends(backend: str) -> tuple[WireGuardBackend, RouteBackend]:
    """The WireGuard and route backends for `backend` (auto | kernel | userspace | memory)."""
    if backend == "memory":
        from wgctl.memory import InMemoryRoutes, InMemoryWireGuard

        wireguard = InMemoryWireGuard()
        return wireguard, InMemoryRoutes(wireguard)
    from wgctl.backends import select_backend
    from wgctl.routes import NetlinkRoutes

    return select_backend(backend), NetlinkRoutes()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshvpn-agent",
        description="meshvpn node agent: joins the mesh once with a join token, then keeps a WireGuard tunnel to "
        "every active member.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML settings file (e.g. /etc/meshvpn/agent.toml)")
    add_completion_options(parser)
    parser.add_argument(
        "command", nargs="?", default="run", choices=["run"], help="what to do (default: run)"
    )
    parser.add_argument("--registrar", help="the registrar's API, https://HOST:8443 (needed to join)")
    parser.add_argument("--join-token", help="join token from `meshvpn-registrar tokens create` (needed to join)")
    parser.add_argument("--broker", help="broker URL mqtts://HOST:PORT (default: the one the registrar names)")
    parser.add_argument("--mesh", help="mesh name")
    parser.add_argument("--name", help="display name (default: hostname)")
    parser.add_argument("--node-id", help="node id (default: generated once, kept in the state dir)")
    parser.add_argument("--interface", help="WireGuard interface name (default meshvpn0)")
    parser.add_argument("--listen-port", type=int, help="WireGuard UDP port (default 51820)")
    parser.add_argument("--endpoint", help="a public HOST[:PORT] to advertise besides the interface addresses and the reflexive one")
    parser.add_argument("--state-dir", help="state directory (default /var/lib/meshvpn)")
    parser.add_argument(
        "--backend", choices=["auto", "kernel", "userspace", "memory"], help="WireGuard backend"
    )
    parser.add_argument("--socket", help="local API socket (default /run/meshvpn/agent.sock)")
    parser.add_argument("--reconcile-interval", type=float, help="seconds between drift repairs (default 10)")
    parser.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """Settings overrides (dotted keys) from parsed flags; unset flags are None and do not override."""
    return {
        "registrar_url": args.registrar,
        "broker.url": args.broker,
        "mesh": args.mesh,
        "join_token": args.join_token,
        "name": args.name,
        "node_id": args.node_id,
        "interface": args.interface,
        "listen_port": args.listen_port,
        "endpoint": args.endpoint,
        "state_dir": args.state_dir,
        "backend": args.backend,
        "socket_path": args.socket,
        "reconcile_interval_s": args.reconcile_interval,
        "log_json": args.log_json,
        "log_level": args.log_level,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of `meshvpn-agent`."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(AgentSettings, path=args.config, overrides=overrides_from(args))
    except ContractError as exc:
        print(f"meshvpn-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(level=settings.log_level, json_format=settings.log_json)
    # Signals first: enrolling may wait for an unreachable registrar, and SIGTERM must end that wait.
    signals = StopSignals().install()
    try:
        wireguard, routes = build_backends(settings.backend)
        agent = Agent(settings, wireguard=wireguard, routes=routes)
        agent.start(stop=signals)
    except EnrollmentRefused as exc:
        log.error("%s", exc)
        print(f"meshvpn-agent: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (AgentError, WireGuardError, ContractError) as exc:
        log.error("cannot start: %s", exc)
        print(f"meshvpn-agent: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # A signal ends the wait at once; the agent giving up (refused registration) within a second.
    while not signals.wait(1.0) and not agent.wait(0):
        pass
    if signals.received is not None:
        log.info("received %s, stopping", signal.Signals(signals.received).name)
    agent.stop()
    if agent.failure is not None:
        print(f"meshvpn-agent: {agent.failure}", file=sys.stderr)
    if agent.exit_code:
        log.error("exiting with status %d", agent.exit_code)
    return agent.exit_code


if __name__ == "__main__":
    sys.exit(main())
