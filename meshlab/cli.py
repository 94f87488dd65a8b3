"""`meshlab`: build a mesh of real node agents in network namespaces and break it on purpose.

The composition root of the lab: loads LabSettings once (file, MESHVPN_* environment, flags) and drives
meshlab.lab.Lab. Every command works from any shell on the same lab directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from meshcontract.completion import add_completion_options, completes
from meshcontract.errors import ContractError
from meshcontract.settings import load_settings
from meshlab.errors import LabError
from meshlab.lab import Lab
from meshlab.report import format_matrix, format_status
from meshlab.settings import LabSettings
from meshlab.store import LabStore
from meshlab.topology import PUBLIC_PLACEMENT, Placement, layout, parse_group, parse_node_list, parse_target


def _say(line: str) -> None:
    print(line, flush=True)


def _lab_names(args: argparse.Namespace, *extra: str) -> list[str]:
    # Runs at every TAB (completion): no lab, or no readable settings, simply offers nothing.
    try:
        state = LabStore(_settings(args).lab_dir).load()
    except (LabError, ContractError):
        return []
    return [node.name for node in state.ordered_nodes()] + list(extra)


# Values of node arguments for the completion script (meshcontract.completion).
COMPLETION_SOURCES = {
    "nodes": _lab_names,
    "exec-targets": lambda args: _lab_names(args, "ctl"),
    "log-sources": lambda args: _lab_names(args, "registrar", "mosquitto"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshlab", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML settings file (LabSettings)")
    parser.add_argument("--lab-dir", help="lab directory (default /var/lib/meshlab, env MESHVPN_LAB_DIR)")
    add_completion_options(parser, sources=COMPLETION_SOURCES)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="build a lab of N nodes")
    p.add_argument("--nodes", type=int, default=3, help="nodes to start (default 3; 0: the control plane alone, "
                                                        "then `meshlab add`)")
    p.add_argument("--broker", choices=["embedded", "mosquitto"])
    p.add_argument("--id", help="lab id (2-5 of [a-z0-9]); random by default")
    p.add_argument("--heartbeat-interval", type=float)
    p.add_argument("--heartbeat-ttl", type=float)
    p.add_argument("--expiry-s", type=float, help="the registrar's expiry_s: how long an unreachable member keeps "
                                                  "its identity and IP (short values for tests)")
    p.add_argument("--nat", action="append", default=[], metavar="NODE[,NODE...]",
                   help="put each named node behind a NAT router of its own (repeatable)")
    p.add_argument("--nat-group", action="append", default=[], metavar="NAME:NODE[,NODE...]",
                   help="put the named nodes behind one shared NAT router called NAME (repeatable, one group each)")

    p = sub.add_parser("down", help="remove everything the lab made (safe to repeat)")
    p.add_argument("--id", help="also clean up namespaces of this lab id (when the state is lost)")

    p = sub.add_parser("status", help="nodes, mesh IPs, agent states, peers and handshakes")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("add", help="add one node (public unless --nat or --behind)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nat", action="store_true", help="behind a NAT router of its own")
    where.add_argument("--behind", metavar="ROUTER", help="behind an existing router (its name or NAT group)")

    p = sub.add_parser("roam", help="change a node's underlay address under its running agent (Wi-Fi -> mobile)")
    completes(p.add_argument("node"), "nodes")
    p.add_argument("--to", metavar="WHERE", help="public (a new LAN address), nat (a new router of its own) or a "
                                                 "router / NAT group name; default: the same kind of network as now")
    for name, text in [("kill", "SIGKILL the node's agent (agent crash; wireguard-go stays)"),
                       ("crash", "SIGKILL every process of the node (machine crash)"),
                       ("freeze", "SIGSTOP every process of the node"),
                       ("thaw", "SIGCONT every process of the node"),
                       ("stop", "SIGTERM the agent (graceful leave)"),
                       ("start", "start the node's agent again"),
                       ("partition", "cut the node's underlay link"),
                       ("heal", "restore the node's underlay link")]:
        completes(sub.add_parser(name, help=text).add_argument("node"), "nodes")
    for name, text in [("cut-control", "drop the node's traffic to and from the control plane (peers still reach it)"),
                       ("restore-control", "undo cut-control"),
                       ("reinstall", "machine reinstalled: crash, state dir deleted, member removed by admin, "
                                     "agent started with a new key")]:
        completes(sub.add_parser(name, help=text).add_argument("node"), "nodes")
    for name, text in [("isolate", "the nodes reach only each other: not the control plane, not other nodes"),
                       ("rejoin", "undo isolate")]:
        completes(sub.add_parser(name, help=text).add_argument("nodes", nargs="+"), "nodes")
    p = sub.add_parser("loss", help="drop PERCENT %% of the packets on the node's link, each way (0: none)")
    completes(p.add_argument("node"), "nodes")
    p.add_argument("percent", type=int, choices=range(0, 101), metavar="PERCENT")
    sub.add_parser("broker", help="stop or start the broker").add_argument("action", choices=["stop", "start"])
    sub.add_parser("registrar", help="stop (SIGTERM), kill (SIGKILL) or start the registrar").add_argument(
        "action", choices=["stop", "kill", "start"])

    p = sub.add_parser("exec", help="run a command on a node: in its namespace, MESHVPN_SOCKET = its agent "
                                    "(ctl = control namespace)")
    completes(p.add_argument("node"), "exec-targets")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    p = sub.add_parser("logs", help="show logs (a node, registrar, mosquitto, or all)")
    completes(p.add_argument("node", nargs="?"), "log-sources")
    p.add_argument("-n", "--lines", type=int, default=40)

    p = sub.add_parser("ping", help="ping matrix over mesh IPs between running nodes")
    p.add_argument("--tcp", action="store_true", help="also a TCP connect to each node's echo probe")
    p.add_argument("--within", type=float, default=0.0, metavar="S",
                   help="retry pairs that do not answer for up to S seconds (default: one try each)")

    p = sub.add_parser("wait", help="wait until the mesh of running nodes is complete")
    p.add_argument("--timeout", type=float, default=30)

    p = sub.add_parser("check", help="check every invariant of the running lab once (exit status: violations found)")
    p.add_argument("--limit", type=float, help="longest to wait for pending findings to settle (default: the "
                                                 "longest bound of the lab)")
    p.add_argument("--no-probe", action="store_true", help="no ping between every pair of healthy nodes")
    p.add_argument("--json", action="store_true", help="print the findings and the last snapshot as JSON")

    p = sub.add_parser("chaos", help="run a random but reproducible schedule of overlapping faults, checking every "
                                     "invariant (exit status: violations found)")
    p.add_argument("--nodes", type=int, default=4, help="nodes of the lab it builds (default 4)")
    p.add_argument("--broker", choices=["embedded", "mosquitto"])
    p.add_argument("--seed", type=int, help="the schedule's seed (default: random, printed)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="steps before the closing ones (default 20)")
    length.add_argument("--duration", type=float, help="run this many seconds, then end every open fault")
    p.add_argument("--replay", metavar="FILE", help="run the schedule in FILE (a --json result or a regression file)")
    p.add_argument("--json", metavar="FILE", help="write the timeline, the violations and the schedule to FILE")
    p.add_argument("--heartbeat-interval", type=float)
    p.add_argument("--heartbeat-ttl", type=float)
    p.add_argument("--keep-going", action="store_true", help="go on after a violation")
    p.add_argument("--no-probe", action="store_true", help="no ping between every pair of healthy nodes at checks")
    p.add_argument("--shrink", type=int, metavar="RUNS",
                   help="spend up to RUNS fresh-lab runs shrinking a failing schedule into a regression file "
                        "(default 6 when the run builds its lab; 0: none)")
    p.add_argument("--regressions", metavar="DIR", help="where a shrunk failing schedule is saved "
                                                         "(default: LAB_DIR/regressions)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the lab's own progress lines")

    p = sub.add_parser("demo", help="the README demo: the brief's final demo in one run (join one by one, NAT, chat, "
                                    "a late join, a leave, agent and node crashes, a control-plane outage), "
                                    "every step checked and timed, a summary table; exit status 0 only if all held")
    p.add_argument("--keep", action="store_true", help="leave the lab up at the end (if every check held)")
    p.add_argument("--id", help="lab id (2-5 of [a-z0-9]); random by default")
    return parser


def _settings(args: argparse.Namespace) -> LabSettings:
    overrides = {
        "lab_dir": args.lab_dir,
        "broker": getattr(args, "broker", None),
        "heartbeat_interval_s": getattr(args, "heartbeat_interval", None),
        "heartbeat_ttl_s": getattr(args, "heartbeat_ttl", None),
        "expiry_s": getattr(args, "expiry_s", None),
    }
    return load_settings(LabSettings, path=args.config, overrides=overrides)


def _logs(lab: Lab, node: str | None, lines: int) -> int:
    root = lab.store.root
    if node in ("registrar", "mosquitto"):
        paths = [root / "control" / f"{node}.log"]
    elif node:
        lab.node(node)  # LabError naming the lab's nodes if there is no such node
        paths = [lab.store.agent_log(node)]
    else:
        paths = [root / "control" / "registrar.log", root / "control" / "mosquitto.log",
                 *sorted((root / "nodes").glob("*/agent.log"))]
    for path in paths:
        if not path.exists():
            continue
        print(f"==> {path} <==")
        text = path.read_text(errors="replace").splitlines()
        print("\n".join(text[-lines:]))
    return 0


def _ping_matrix(lab: Lab, *, tcp: bool, within: float) -> int:
    matrix = lab.reachability(tcp=tcp, timeout_s=within)
    print(format_matrix(matrix.names, matrix.answered("ping")))
    if tcp:
        print("tcp:")
        print(format_matrix(matrix.names, matrix.answered("tcp")))
    if within and matrix.ok():
        print(f"every pair answered within {matrix.slowest_s() or 0:.1f} s")
    return 0 if matrix.ok() else 1


def _check(lab: Lab, *, limit: float | None, probe: bool, as_json: bool) -> int:
    from meshlab.checkloop import describe, settle
    from meshlab.invariants import Bounds, Memory

    st = lab.state()
    bounds = Bounds.for_lab(interval_s=st.heartbeat_interval_s, ttl_s=st.heartbeat_ttl_s)
    verdict, _ = settle(lab, bounds=bounds, memory=Memory(), probe=probe,
                        limit_s=limit if limit is not None else bounds.settle_s + 5)
    if as_json:
        print(json.dumps({"violations": [f.to_dict() for f in verdict.violations],
                          "pending": [f.to_dict() for f in verdict.pending], "looks": verdict.looks,
                          "snapshot": verdict.snapshot.to_dict() if verdict.snapshot else None}, indent=2))
    else:
        for finding in verdict.violations:
            print(f"VIOLATION {describe(finding)}")
        for finding in verdict.pending:
            print(f"still pending {describe(finding)}")
        print(f"{len(verdict.violations)} violation(s) in {verdict.looks} look(s) over {verdict.took_s:.1f} s")
    # The exit status is the number of violations; capped so it never reads as a signal (128+).
    return min(len(verdict.violations), 125)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    lab = Lab(settings, report=_say)
    cmd = args.cmd
    if cmd == "up":
        if os.geteuid() != 0:
            raise LabError("meshlab up needs root (network namespaces, wireguard-go)")
        nat = [name for text in args.nat for name in parse_node_list(text)]
        groups = [parse_group(text) for text in args.nat_group]
        layout(args.nodes, nat=nat, groups=groups)  # a mistake in the topology is refused before anything is made
        try:
            lab.up(args.nodes, lab_id=args.id, nat=nat, nat_groups=groups)
        except (LabError, ContractError):
            _say(f"up failed; the lab is left for inspection (meshlab logs), remove it with: "
                 f"meshlab --lab-dir {settings.lab_dir} down")
            raise
        _say(f"lab up in {settings.lab_dir}: try `meshlab --lab-dir {settings.lab_dir} status`")
        return 0
    if cmd == "down":
        lab.down(lab_id=args.id)
        return 0
    if cmd == "status":
        rows, routers = lab.rows(), lab.router_rows()
        if args.json:
            print(json.dumps({"services": lab.services(), "nodes": [r.as_dict() for r in rows],
                              "routers": [r.as_dict() for r in routers]}, indent=2))
        else:
            print(format_status(rows, services=lab.services(), routers=routers))
        return 0
    if cmd == "add":
        lab.add(Placement("nat") if args.nat else parse_target(lab.state(), args.behind) if args.behind
                else PUBLIC_PLACEMENT)
        return 0
    if cmd == "roam":
        lab.roam(args.node, args.to)
        return 0
    if cmd in ("kill", "crash", "freeze", "thaw", "stop", "start", "partition", "heal"):
        getattr(lab, cmd)(args.node)
        return 0
    if cmd == "registrar" and args.action == "kill":
        lab.faults.kill_registrar()
        return 0
    if cmd in ("broker", "registrar"):
        getattr(lab, cmd)(args.action)
        return 0
    if cmd in ("cut-control", "restore-control", "reinstall"):
        getattr(lab.faults, cmd.replace("-", "_"))(args.node)
        return 0
    if cmd in ("isolate", "rejoin"):
        getattr(lab.faults, cmd)(args.nodes)
        return 0
    if cmd == "loss":
        lab.faults.loss(args.node, args.percent)
        return 0
    if cmd == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise LabError("usage: meshlab exec NODE -- COMMAND [ARGS...]")
        # Does not return: meshlab becomes the command, so Ctrl-C, SIGTERM and the exit status are its own.
        lab.exec_in_place(args.node, argv)
    if cmd == "logs":
        return _logs(lab, args.node, args.lines)
    if cmd == "ping":
        return _ping_matrix(lab, tcp=args.tcp, within=args.within)
    if cmd == "wait":
        took = lab.wait_mesh(timeout=args.timeout)
        _say(f"mesh of {', '.join(lab.running_nodes())} complete ({took:.1f} s)")
        return 0
    if cmd == "chaos":
        from meshlab.chaoscli import run_chaos

        return run_chaos(lab, settings, args, say=_say)
    if cmd == "check":
        return _check(lab, limit=args.limit, probe=not args.no_probe, as_json=args.json)
    if cmd == "demo":
        from meshlab.demo import run_demo

        return run_demo(settings, keep=args.keep, lab_id=args.id)
    raise LabError(f"unknown command {cmd}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (LabError, ContractError) as exc:
        print(f"meshlab: {exc}", file=sys.stderr)
        return 1
    except KeyError as exc:
        print(f"meshlab: unknown {exc}", file=sys.stderr)
        return 1
    except subprocess.SubprocessError as exc:
        print(f"meshlab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

