"""Shell completion: what the renderer (meshcontract.completionscript) reads from a parser, the script text, the
options every command gets (meshcontract.completion), and meshctl's peer candidates."""

from __future__ import annotations

import argparse

import pytest

from meshcontract.completion import DIR, FILE, add_completion_options, completes, is_shell_word
from meshcontract.completionscript import (
    Command,
    Option,
    Slot,
    describe,
    infer_hint,
    render,
    render_bash,
    render_zsh,
)
from meshcontract.localapi import AgentStatus, PeerView
from nodeagent.meshctl import peer_candidates


def _parser(*args: str, **kwargs: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo", add_help=False)
    parser.add_argument(*args, **kwargs)  # type: ignore[arg-type]
    return parser


@pytest.mark.parametrize(
    ("args", "kwargs", "hint"),
    [
        (("--config",), {}, FILE),
        (("--password-file",), {}, FILE),
        (("--certfile",), {}, FILE),
        (("--socket",), {}, FILE),
        (("--state-dir",), {}, DIR),
        (("--dir",), {}, DIR),
        (("--replay",), {"metavar": "FILE"}, FILE),
        (("--json",), {"metavar": "FILE"}, FILE),
        (("--regressions",), {"metavar": "DIR"}, DIR),
        (("--out",), {"metavar": "PATH"}, FILE),
        (("--to",), {"metavar": "WHERE"}, None),
        (("--config",), {"metavar": "NAME"}, None),  # an explicit metavar wins over the dest
        (("--name",), {}, None),
        (("target",), {}, None),
    ],
)
def test_hints_are_inferred_from_metavar_then_dest(args, kwargs, hint):
    parser = _parser(*args, **kwargs)
    assert infer_hint(parser._actions[-1]) == hint


def test_an_annotation_wins_over_inference():
    parser = argparse.ArgumentParser(prog="demo")
    action = completes(parser.add_argument("--config"), "peers")
    assert infer_hint(action) == "peers"


@pytest.mark.parametrize(
    ("slot", "spec"),
    [
        (Slot(), "free"),
        (Slot(words=("a", "b")), "w a b"),
        (Slot(words=("a",), hint=FILE), "w a"),  # fixed choices win over a hint
        (Slot(hint=FILE), "f"),
        (Slot(hint=DIR), "d"),
        (Slot(hint="peers"), "x peers"),
        (Slot(rest=True), "rest"),
    ],
)
def test_slot_spec(slot, spec):
    assert slot.spec() == spec


def _tree() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--config")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--hidden", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="cmd", required=True)
    ping = sub.add_parser("ping")
    completes(ping.add_argument("target"), "peers")
    ping.add_argument("-c", "--count", type=int)
    loss = sub.add_parser("loss")
    loss.add_argument("node")
    loss.add_argument("percent", type=int, choices=range(0, 3))
    iso = sub.add_parser("isolate")
    iso.add_argument("nodes", nargs="+")
    ex = sub.add_parser("exec")
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    pair = sub.add_parser("pair")
    pair.add_argument("ends", nargs=2, choices=["a", "b"])
    nested = sub.add_parser("tokens").add_subparsers(dest="tokens_cmd", required=True)
    nested.add_parser("list")
    create = nested.add_parser("create")
    create.add_argument("--kind", choices=["one", "many"])
    return parser


HELP = Option(("-h", "--help"))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ((), None),  # checked field by field below
        (("ping",), Command(options=(HELP, Option(("-c", "--count"), Slot())), positionals=(Slot(hint="peers"),))),
        (("loss",), Command(options=(HELP,), positionals=(Slot(), Slot(words=("0", "1", "2"))))),
        (("isolate",), Command(options=(HELP,), positionals=(Slot(),), repeats=True)),
        (("exec",), Command(options=(HELP,), positionals=(Slot(), Slot(rest=True)), repeats=True)),
        (("pair",), Command(options=(HELP,), positionals=(Slot(words=("a", "b")),) * 2)),
        (("tokens", "create"), Command(options=(HELP, Option(("--kind",), Slot(words=("one", "many")))))),
        (("tokens", "list"), Command(options=(HELP,))),
    ],
)
def test_describe_walks_subcommands_options_and_positionals(path, expected):
    command = describe(_tree())
    for name in path:
        command = dict(command.subcommands)[name]
    if expected is not None:
        assert command == expected
        return
    assert command.options == (HELP, Option(("--config",), Slot(hint=FILE)), Option(("-v", "--verbose")))
    assert [name for name, _ in command.subcommands] == ["ping", "loss", "isolate", "exec", "pair", "tokens"]
    assert command.positionals == ()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: (p.add_argument("first"), p.add_subparsers().add_parser("x")), "positionals beside subcommands"),
        (lambda p: p.add_argument("--mode", choices=["a b"]), "one shell word"),
        (lambda p: p.add_argument("--mode", choices=["$(x)"]), "one shell word"),
    ],
)
def test_describe_refuses_what_the_script_cannot_express(build, message):
    parser = argparse.ArgumentParser(prog="demo")
    build(parser)
    with pytest.raises(ValueError, match=message):
        describe(parser)


def test_bash_script_binds_one_function_to_the_program():
    script = render_bash(_tree())
    assert "_demo_complete() {" in script
    assert script.rstrip().endswith("complete -F _demo_complete demo")
    assert "--hidden" not in script, "a suppressed option is never offered"


def test_function_name_is_a_shell_identifier():
    parser = argparse.ArgumentParser(prog="meshvpn-agent")
    assert "complete -F _meshvpn_agent_complete meshvpn-agent" in render_bash(parser)


def test_zsh_script_loads_the_bash_function_through_bashcompinit():
    parser = _tree()
    zsh = render_zsh(parser)
    assert "bashcompinit" in zsh
    body = render_bash(parser).split("\n", 3)[3]
    assert zsh.endswith(body)


def test_render_by_shell_name():
    parser = _tree()
    assert render(parser, shell="bash") == render_bash(parser)
    assert render(parser, shell="zsh") == render_zsh(parser)
    with pytest.raises(ValueError, match="fish"):
        render(parser, shell="fish")


def test_rendering_is_deterministic():
    # install.sh compares the script with the installed one: the same parser must give the same bytes.
    assert render_bash(_tree()) == render_bash(_tree())


def test_print_completion_prints_the_script_and_exits_whatever_a_parser_requires(capsys):
    parser = _tree()
    add_completion_options(parser)
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--print-completion", "bash"])
    assert done.value.code == 0
    assert "complete -F _demo_complete demo" in capsys.readouterr().out


def test_print_completion_knows_only_bash_and_zsh(capsys):
    parser = _tree()
    add_completion_options(parser)
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--print-completion", "fish"])
    assert done.value.code == 2


@pytest.mark.parametrize(
    ("value", "offered"),
    [
        ("beta", True),
        ("100.96.0.2", True),
        ("fd00::2", True),
        ("n1-td", True),
        ("jürgen", True),
        ("", False),
        ("my laptop", False),  # split in two
        ("it's", False),
        ("$(reboot)", False),  # compgen -W would run it
        ("`reboot`", False),
        ("~root", False),  # expanded to a home directory
        ("{a,b}", False),
        ("a*", False),
        ("a;b", False),
        ("tab\there", False),
    ],
)
def test_only_plain_shell_words_are_offered(value, offered, capsys):
    assert is_shell_word(value) is offered
    parser = argparse.ArgumentParser(prog="demo")
    add_completion_options(parser, sources={"peers": lambda args: [value, "ok"]})
    with pytest.raises(SystemExit):
        parser.parse_args(["--complete-values", "peers"])
    assert capsys.readouterr().out.splitlines() == ([value, "ok"] if offered else ["ok"])


def test_complete_values_prints_a_source_with_the_options_given_before_it(capsys):
    parser = _tree()
    add_completion_options(parser, sources={"peers": lambda args: [f"from-{args.config}", "10.0.0.2"]})
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--config", "c.toml", "--complete-values", "peers"])
    assert done.value.code == 0
    assert capsys.readouterr().out.splitlines() == ["from-c.toml", "10.0.0.2"]
    assert "--complete-values" not in parser.format_help(), "the scripts' own option stays out of --help"


def _status(*peers: tuple[str, str]) -> AgentStatus:
    views = [PeerView(node_id=f"id-{i}", name=name, mesh_ip=ip, public_key="k", state="active", configured=True)
             for i, (name, ip) in enumerate(peers)]
    return AgentStatus(node_id="self", name="self", mesh_ip="100.96.0.1", prefix_len=16, interface="mv0",
                       broker_connected=True, registrar_online=True, membership_revision=1,
                       membership_complete=True, peers=views, now=0.0)


@pytest.mark.parametrize(
    ("peers", "candidates"),
    [
        ((), []),
        ((("beta", "100.96.0.2"),), ["beta", "100.96.0.2"]),
        ((("beta", "100.96.0.2"), ("beta", "100.96.0.3")), ["beta", "100.96.0.2", "100.96.0.3"]),  # once each
        ((("", "100.96.0.7"),), ["100.96.0.7"]),
    ],
)
def test_meshctl_ping_candidates(peers, candidates):
    assert peer_candidates(_status(*peers)) == candidates
