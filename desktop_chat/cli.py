"""`meshchat`: the composition root. `gui` (default) opens the window; `send` and `listen` are headless.

    meshchat [gui] [--socket PATH] [--state-dir DIR] [--name NAME] [--port N]
    meshchat send --to MESH_IP [--timeout S] TEXT...      exit 0 iff delivered and acknowledged
    meshchat listen [--bind IP] [--allow IP ...] [--count N] [--json]   prints "FROM_IP NAME: TEXT" per message

The agent socket is --socket, else MESHVPN_SOCKET, else /run/meshvpn/agent.sock (ChatSettings.socket).

Exit codes: 0 success, 1 not delivered / runtime failure (reason on stderr), 2 usage or setup error.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import threading
import time

from desktop_chat import output
from desktop_chat.errors import ChatError, PeerSourceError
from desktop_chat.history import HistoryStore, MemoryHistory, Record, SqliteHistory
from desktop_chat.peers import AgentPeerSource, MemoryPeerSource, PeerDirectory, PeerSource, static_status
from desktop_chat.session import ChatSession, PeerPoller
from desktop_chat.settings import ChatSettings, default_state_dir
from meshcontract import logs
from meshcontract.completion import add_completion_options, completes
from meshcontract.errors import ContractError
from meshcontract.settings import load_settings

log = logging.getLogger(__name__)

COMMANDS = ("gui", "send", "listen")
# Defaults of the options every command shares. They are declared with SUPPRESS on the top-level parser and on
# each subcommand so they may stand before or after the subcommand; the real defaults are filled in here.
COMMON_DEFAULTS = {"config": None, "socket": None, "port": None, "state_dir": None, "name": None, "bind": None,
                   "log_level": "WARNING", "log_json": False}


def _common(parser: argparse.ArgumentParser) -> None:
    hide = argparse.SUPPRESS
    parser.add_argument("--config", default=hide, help="TOML settings file")
    parser.add_argument("--socket", default=hide, help="node agent socket (default: $MESHVPN_SOCKET, else /run/meshvpn/agent.sock)")
    parser.add_argument("--port", type=int, default=hide, help="chat TCP port on every mesh IP (default 7800)")
    parser.add_argument("--state-dir", default=hide, help="keep history.db here")
    parser.add_argument("--name", default=hide, help="our display name in messages (display only)")
    parser.add_argument("--bind", default=hide,
                        help="listen on / send from this IP instead of our mesh IP from the agent (tests, demos)")
    parser.add_argument("--log-level", default=hide, help="DEBUG, INFO, WARNING (default), ERROR")
    parser.add_argument("--log-json", action="store_true", default=hide, help="log one JSON object per line")


def _complete_peer_ips(args: argparse.Namespace) -> list[str]:
    # Runs at every TAB (completion): the shared options were declared with SUPPRESS, so they may be absent; no
    # agent, or no readable settings, offers nothing.
    try:
        settings = load_settings(ChatSettings, path=getattr(args, "config", None),
                                 overrides={"socket": getattr(args, "socket", None)})
        return [peer.mesh_ip for peer in AgentPeerSource(settings.socket, timeout=2.0).status().peers]
    except (ContractError, PeerSourceError):
        return []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshchat", description="Chat directly over mesh IPs (meshvpn demo).",
                                     epilog="Without a command: gui.")
    _common(parser)
    add_completion_options(parser, sources={"peer-ips": _complete_peer_ips})
    sub = parser.add_subparsers(dest="command")
    gui = sub.add_parser("gui", help="open the chat window (default)")
    _common(gui)
    send = sub.add_parser("send", help="send one message and wait for the ack")
    _common(send)
    completes(send.add_argument("--to", required=True, help="the peer's mesh IP (names are display only)"), "peer-ips")
    send.add_argument("--timeout", type=float, help="seconds for connect + send + ack (default 5)")
    send.add_argument("text", nargs="+", help="the message")
    listen = sub.add_parser("listen", help="receive messages and print them, one line each")
    _common(listen)
    completes(listen.add_argument("--allow", action="append", metavar="IP",
                                  help="accept messages from this IP (repeat); replaces the agent's member list; "
                                       "needs --bind"), "peer-ips")
    listen.add_argument("--count", type=int, help="exit after N messages")
    listen.add_argument("--json", action="store_true",
                        help="one JSON object per event on stdout (listening, message; see desktop_chat/output.py)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; shared options may come before or after the command, which defaults to gui."""
    args = build_parser().parse_args(argv)
    for key, default in COMMON_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, default)
    args.command = args.command or "gui"
    return args


def _settings(args: argparse.Namespace) -> ChatSettings:
    overrides = {
        "socket": args.socket,
        "port": args.port,
        "state_dir": args.state_dir,
        "name": args.name,
        "bind": args.bind,
        "timeout": getattr(args, "timeout", None),
        "allow": getattr(args, "allow", None),
    }
    return load_settings(ChatSettings, path=args.config, overrides=overrides)


def _history(settings: ChatSettings, *, required: bool) -> HistoryStore:
    # Headless commands keep history only when asked: several lab nodes on one host share $HOME.
    state_dir = settings.state_dir or (default_state_dir() if required else None)
    if state_dir is None:
        return MemoryHistory()
    history = SqliteHistory(state_dir / "history.db")
    stale = history.fail_pending("interrupted: meshchat exited before the ack")
    if stale:
        log.info("%s messages left sending by an earlier run marked failed", stale)
    return history


def _check_ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ChatError(f"{what} {value!r} is not an IP address (names are display only; use the mesh IP)") from None


def cmd_send(settings: ChatSettings, to: str, text: str) -> int:
    peer_ip = _check_ip(to, "--to")
    directory = PeerDirectory()
    if settings.bind is None:
        # Our mesh IP as the source makes the receiver's membership check see the right address; if the
        # agent does not answer the kernel still picks the mesh address for a mesh route.
        try:
            directory.update(AgentPeerSource(settings.socket, timeout=2.0).snapshot(now=time.time()))
        except PeerSourceError as exc:
            log.info("agent not reachable, sending without binding our mesh IP: %s", exc)
    history = _history(settings, required=False)
    session = ChatSession(history=history, directory=directory, port=settings.port, timeout=settings.timeout,
                          name=settings.name, bind=settings.bind)
    started = time.monotonic()
    try:
        record = session.send_now(peer_ip, text)
    finally:
        history.close()
    if record.status == "delivered":
        peer = directory.get(peer_ip)
        print(output.delivered_line(peer_ip, peer.name if peer else None, time.monotonic() - started), flush=True)
        return 0
    print(f"meshchat: not delivered to {peer_ip}: {record.reason}", file=sys.stderr)
    return 1


def cmd_listen(settings: ChatSettings, count: int | None, *, json_events: bool = False) -> int:
    now = time.time()
    source: PeerSource
    if settings.allow:
        allowed = [_check_ip(ip, "--allow") for ip in settings.allow]
        if settings.bind is None:
            raise ChatError("--allow needs --bind (there is no agent to tell us our mesh IP)")
        source = MemoryPeerSource(static_status(self_ip=settings.bind, name=settings.name or "meshchat",
                                                member_ips=allowed, now=now))
    else:
        source = AgentPeerSource(settings.socket, timeout=2.0, window=settings.handshake_window)
    if settings.bind is not None:
        _check_ip(settings.bind, "--bind")
    directory = PeerDirectory()
    history = _history(settings, required=False)
    session = ChatSession(history=history, directory=directory, port=settings.port, timeout=settings.timeout,
                          name=settings.name, bind=settings.bind)
    received = 0
    done = threading.Event()
    lock = threading.Lock()
    output_lock = threading.Lock()

    def emit(line: str, *, status: bool = False) -> None:
        # Status lines go to stderr for people, stdout in --json mode; messages (server threads) and status
        # (poller thread) may then share stdout: one locked write per line, so no line is torn.
        stream = sys.stderr if status and not json_events else sys.stdout
        with output_lock:
            stream.write(line + "\n")
            stream.flush()

    def on_record(record: Record) -> None:
        nonlocal received
        if record.direction != "in":
            return
        with lock:
            if done.is_set():
                return
            emit(output.message_event(record) if json_events else output.message_line(record))
            received += 1
            if count is not None and received >= count:
                done.set()

    session.subscribe(on_record)
    listening = threading.Event()
    failure: list[str] = []

    said: set[str] = set()

    def waiting(detail: str) -> None:
        if detail in said:
            return
        said.add(detail)
        emit(output.waiting_event(detail) if json_events else output.waiting_line(detail), status=True)

    def on_update(snapshot, error) -> None:
        try:
            address = session.ensure_listening()
        except ChatError as exc:
            if settings.bind is not None:
                failure.append(str(exc))  # an explicit address that cannot be bound is a usage error
                done.set()
                return
            # The agent may know our mesh IP a moment before the interface carries it: keep trying.
            waiting(f"{exc}; retrying")
            return
        if address and not listening.is_set():
            listening.set()
            emit(output.listening_event(*address) if json_events else output.listening_line(*address),
                 status=True)
        elif not address and error:
            waiting(f"waiting for the agent to tell us our mesh IP: {error}")

    poller = PeerPoller(source, directory, interval=settings.poll_interval, on_update=on_update)
    poller.start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        poller.stop()
        session.close()
        history.close()
    if failure:
        print(f"meshchat: {failure[0]}", file=sys.stderr)
        return 2
    return 0


def cmd_gui(settings: ChatSettings) -> int:
    try:
        from desktop_chat import window  # Qt is an optional extra: import it only for the GUI
    except ImportError as exc:
        print(f"meshchat: the GUI needs PySide6 ({exc}); install meshvpn[chat] "
              "or use `meshchat send` / `meshchat listen`", file=sys.stderr)
        return 2
    if settings.state_dir is None:
        settings = settings.model_copy(update={"state_dir": default_state_dir()})
    return window.run(settings, history=_history(settings, required=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logs.setup(level=args.log_level, json_format=args.log_json)
    try:
        settings = _settings(args)
        if args.command == "send":
            return cmd_send(settings, args.to, " ".join(args.text))
        if args.command == "listen":
            return cmd_listen(settings, args.count, json_events=args.json)
        return cmd_gui(settings)
    except (ChatError, ContractError) as exc:
        print(f"meshchat: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
