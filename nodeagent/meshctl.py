"""`meshctl`: ask the local agent how the mesh looks (`status`), whether a peer answers (`ping`), and give this
node a new WireGuard key (`rotate-key`).

The agent's socket is `--socket PATH` (before or after the command), else $MESHVPN_SOCKET, else
/run/meshvpn/agent.sock. The rendering functions and the explanation of a failed connection are pure (they take
values and return text) so they are tested without an agent.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Mapping

from meshcontract.errors import ContractError
from meshcontract.localapi import DEFAULT_SOCKET, AgentStatus, LocalRequest, PingResult, RotateResult, query

EXIT_NOT_RUNNING = 2
EXIT_FAILED = 1
SOCKET_ENV = "MESHVPN_SOCKET"
AGENT_GROUP = "meshvpn"  # the group docs/agent.md gives the socket (socket_group) for non-root users


def format_age(then: float | None, *, now: float) -> str:
    """How long ago `then` was, like `tailscale status`: "12s ago", "3m ago", "2h ago", "never"."""
    if then is None or then <= 0:
        return "never"
    age = max(0.0, now - then)
    if age < 120:
        return f"{int(age)}s ago"
    if age < 7200:
        return f"{int(age // 60)}m ago"
    if age < 172800:
        return f"{int(age // 3600)}h ago"
    return f"{int(age // 86400)}d ago"


def format_bytes(count: int) -> str:
    """Byte counts the way people read them: 0 B, 1.5 KiB, 12.0 MiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_status(status: AgentStatus) -> str:
    """The header and peer table `meshctl status` prints."""
    address = f"{status.mesh_ip}/{status.prefix_len}" if status.mesh_ip else "(not registered yet)"
    lines = [
        f"node       {status.name} ({status.node_id})",
        f"mesh ip    {address} on {status.interface}",
        f"broker     {'connected' if status.broker_connected else 'DISCONNECTED (tunnels kept)'}",
        f"registrar  {'online' if status.registrar_online else 'OFFLINE (tunnels kept)'}",
        f"membership revision {status.membership_revision}, "
        + ("complete" if status.membership_complete else "INCOMPLETE (no peer is removed until complete)"),
        "",
    ]
    header = ("NAME", "MESH IP", "STATE", "HANDSHAKE", "ENDPOINT", "RX", "TX")
    rows = [header]
    for peer in status.peers:
        state = "active (no tunnel yet)" if peer.state == "active" and not peer.configured else peer.state
        rows.append(
            (
                peer.name,
                peer.mesh_ip,
                state,
                format_age(peer.latest_handshake, now=status.now) if peer.configured else "-",
                peer.endpoint or "-",
                format_bytes(peer.rx_bytes),
                format_bytes(peer.tx_bytes),
            )
        )
    if len(rows) == 1:
        lines.append("no peers")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def render_ping(result: PingResult) -> str:
    """One line per probe and a summary, like ping(8)."""
    lines = [f"PING {result.target} ({result.mesh_ip}) over the mesh"]
    for seq, rtt in enumerate(result.rtts_ms, start=1):
        lines.append(f"seq={seq} time={rtt:.2f} ms" if rtt is not None else f"seq={seq} timeout")
    got = [r for r in result.rtts_ms if r is not None]
    loss = 100 * (len(result.rtts_ms) - len(got)) // max(1, len(result.rtts_ms))
    summary = f"{len(result.rtts_ms)} sent, {len(got)} received, {loss}% loss"
    if got:
        summary += f", rtt min/avg/max {min(got):.2f}/{sum(got) / len(got):.2f}/{max(got):.2f} ms"
    lines.append(summary)
    return "\n".join(lines)


def render_rotated(result: RotateResult) -> str:
    """What `meshctl rotate-key` prints."""
    lines = [
        f"new public key  {result.public_key}",
        f"old public key  {result.previous_public_key} (no longer accepted by peers)",
        f"mesh ip         {result.mesh_ip or '(not registered yet)'} (unchanged)",
    ]
    if not result.confirmed:
        lines.append("the registrar did not confirm in time: the agent registers the new key on its next connection")
    return "\n".join(lines)


def explain_unreachable(socket_path: str, error: OSError, *, exists: bool) -> str:
    """Why the agent at `socket_path` could not be asked, and what to do about it, in one line. Pure.

    `error` is the failure of the connection; `exists` whether anything is at `socket_path`.
    """
    where = f"--socket PATH or {SOCKET_ENV}=PATH"
    code = error.errno
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied on {socket_path}: run as root or join group {AGENT_GROUP}"
    if not exists or code == errno.ENOENT:
        return f"the agent is not running at {socket_path} (no socket there); another agent: {where}"
    if code == errno.ECONNREFUSED:
        return (f"the agent is not running at {socket_path} (a socket is there but nobody answers); "
                f"another agent: {where}")
    return f"cannot reach the agent at {socket_path}: {os.strerror(code) if code else error}"


def resolve_socket(flag: str | None, environ: Mapping[str, str]) -> str:
    """The agent socket to use: the --socket flag, else $MESHVPN_SOCKET, else the default. Pure."""
    return flag or environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def _socket_option(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument("--socket", default=default,
                        help=f"agent socket (default ${SOCKET_ENV}, else {DEFAULT_SOCKET})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Inspect the local meshvpn agent.")
    _socket_option(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="this node and its peers")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    ping = sub.add_parser("ping", help="ping a peer's mesh IP through the tunnel")
    ping.add_argument("target", help="node name, node id or mesh IP")
    ping.add_argument("-c", "--count", type=int, default=3, help="probes to send (1-20)")
    ping.add_argument("--json", action="store_true", help="machine-readable output")
    rotate = sub.add_parser(
        "rotate-key", help="give this node a new WireGuard key pair (same mesh IP; peers switch to it)"
    )
    rotate.add_argument("--json", action="store_true", help="machine-readable output")
    # Also accepted after the command ("meshctl status --socket S"); SUPPRESS keeps an absent option from
    # overwriting one given before the command.
    for command in (status, ping, rotate):
        _socket_option(command, default=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The command line, with `socket` resolved (flag anywhere, then MESHVPN_SOCKET, then the default)."""
    args = _parser().parse_args(argv)
    args.socket = resolve_socket(args.socket, os.environ if environ is None else environ)
    return args


def _cause(exc: BaseException) -> OSError | None:
    # meshcontract.localapi.query raises ContractError from the OSError of the connection.
    current: BaseException | None = exc
    while current is not None and not isinstance(current, OSError):
        current = current.__cause__
    return current


def main(argv: list[str] | None = None) -> int:
    """Entry point of `meshctl`."""
    args = parse_args(argv)
    if args.command in ("status", "rotate-key"):
        request = LocalRequest(op=args.command)
    else:
        if not 1 <= args.count <= 20:
            print("meshctl: --count must be between 1 and 20", file=sys.stderr)
            return EXIT_FAILED
        request = LocalRequest(op="ping", target=args.target, count=args.count)
    try:
        response = query(
            request, socket_path=args.socket, timeout=args.count + 10 if args.command == "ping" else 20
        )
    except ContractError as exc:
        cause = _cause(exc)
        if cause is None:  # it answered, but not with a valid response
            print(f"meshctl: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"meshctl: {explain_unreachable(args.socket, cause, exists=os.path.lexists(args.socket))}",
              file=sys.stderr)
        return EXIT_NOT_RUNNING
    if not response.ok:
        print(f"meshctl: {response.error}", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "status":
        assert response.status is not None
        if args.json:
            print(response.status.model_dump_json(indent=2))
        else:
            print(render_status(response.status))
        return 0
    if args.command == "rotate-key":
        assert response.rotated is not None
        print(response.rotated.model_dump_json(indent=2) if args.json else render_rotated(response.rotated))
        return 0
    assert response.ping is not None
    print(response.ping.model_dump_json(indent=2) if args.json else render_ping(response.ping))
    return 0 if any(r is not None for r in response.ping.rtts_ms) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
