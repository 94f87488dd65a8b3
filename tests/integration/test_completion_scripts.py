"""Shell completion as the shells run it: the scripts every command prints are valid, and TAB offers what it should.

A TAB is simulated the way bash-completion drives a script: source it in a fresh `bash`, set COMP_WORDS and
COMP_CWORD (the last word is the one being completed, "" right after a space), call the function `complete`
bound to the command, print COMPREPLY. Under zsh, the way bashcompinit's _bash_complete does it (same
variables, the function called through its `compgen -F`); zsh then keeps the candidates that start with the
word, as its compadd would. The scripts of the real commands come from their entry points
(`CMD --print-completion bash|zsh`), run as processes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from desktop_chat.agentstub import StubAgent
from meshcontract.completion import add_completion_options, completes
from meshcontract.completionscript import render_bash
from meshcontract.localapi import AgentStatus, PeerView
from meshlab.state import ControlRecord, LabState, NodeRecord
from meshlab.store import LabStore

REPO = Path(__file__).resolve().parents[2]
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]

# $1 the script, $2 the command name it binds, then the words of the line.
_DRIVER = r"""
source "$1" || exit 3
prog=$2; shift 2
spec=$(complete -p "$prog") || exit 4
fn=${spec##*-F }; fn=${fn%% *}
COMP_WORDS=("$@")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE="${COMP_WORDS[*]}"
COMP_POINT=${#COMP_LINE}
"$fn" "$prog" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
[ ${#COMPREPLY[@]} -eq 0 ] || printf '%s\n' "${COMPREPLY[@]}"
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHVPN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def tab(script: Path, words: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> list[str]:
    """COMPREPLY for the command line `words` (words[0] the command, the last word the one being completed)."""
    prog = Path(words[0]).name
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", _DRIVER, "tab", str(script), prog, *words],
                          capture_output=True, text=True, timeout=30, env=env or _env(), cwd=cwd or "/")
    assert proc.returncode == 0, f"completion of {words} failed ({proc.returncode}): {proc.stderr}"
    assert proc.stderr == "", f"completion of {words} wrote to stderr: {proc.stderr}"
    return proc.stdout.splitlines()


# $1 the script, $2 the function, then the words; what bashcompinit's _bash_complete sets up, without compadd.
_ZSH_DRIVER = r"""
autoload -U compinit && compinit -u -D
source "$1" || exit 3
fn=$2; shift 2
words=("$@")
CURRENT=$#
COMP_WORDS=("${words[@]}")
COMP_CWORD=$((CURRENT - 1))
print -l -r -- ${(f)"$(compgen -F $fn -- ${words[CURRENT]})"}
"""
ZSH = shutil.which("zsh")
needs_zsh = pytest.mark.skipif(ZSH is None, reason="zsh is not installed: the zsh scripts are run only where it is")


def tab_zsh(script: Path, words: list[str], *, env: dict[str, str] | None = None) -> list[str]:
    """The candidates zsh offers for `words` through bashcompinit (see the module docstring)."""
    assert ZSH is not None
    function = re.search(r"complete -F (\S+)", script.read_text())
    assert function is not None
    proc = subprocess.run([ZSH, "-f", "-c", _ZSH_DRIVER, "tab", str(script), function.group(1), *words],
                          capture_output=True, text=True, timeout=30, env=env or _env(), cwd="/")
    assert proc.returncode == 0, f"zsh completion of {words} failed ({proc.returncode}): {proc.stderr}"
    assert proc.stderr == "", f"zsh completion of {words} wrote to stderr: {proc.stderr}"
    return [word for word in proc.stdout.splitlines() if word and word.startswith(words[-1])]


def _entry_point(command: str) -> list[str]:
    module, function = SCRIPTS[command].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def _executable(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# --- the renderer, on a small parser --------------------------------------------------------------------------


def _demo() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--config")
    parser.add_argument("--lab-dir")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_completion_options(parser, sources={"peers": lambda args: []})
    sub = parser.add_subparsers(dest="cmd", required=True)
    ping = sub.add_parser("ping")
    completes(ping.add_argument("target"), "peers")
    ping.add_argument("-c", "--count", type=int)
    loss = sub.add_parser("loss")
    loss.add_argument("node")
    loss.add_argument("percent", type=int, choices=range(0, 3))
    sub.add_parser("isolate").add_argument("nodes", nargs="+")
    ex = sub.add_parser("exec")
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("pair").add_argument("ends", nargs=2, choices=["a", "b"])
    tokens = sub.add_parser("tokens").add_subparsers(dest="tokens_cmd", required=True)
    tokens.add_parser("list")
    create = tokens.add_parser("create")
    create.add_argument("--kind", choices=["one", "many"])
    create.add_argument("--out", metavar="DIR")
    return parser


@pytest.fixture(scope="module")
def demo_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.bash"
    path.write_text(render_bash(_demo()))
    return path


ROOT_OPTIONS = ["-h", "--help", "--config", "--lab-dir", "-v", "--verbose", "--print-completion"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (["demo", ""], ["ping", "loss", "isolate", "exec", "pair", "tokens"]),
        (["demo", "t"], ["tokens"]),
        (["demo", "-"], ROOT_OPTIONS),
        (["demo", "--v"], ["--verbose"]),
        (["demo", "-v", "--config", "x.toml", "p"], ["ping", "pair"]),  # option values are not subcommands
        (["demo", "--print-completion", ""], ["bash", "zsh"]),
        (["demo", "ping", "-"], ["-h", "--help", "-c", "--count"]),
        (["demo", "ping", "--count", "3", "--c"], ["--count"]),
        (["demo", "tokens", ""], ["list", "create"]),
        (["demo", "tokens", "create", "--kind", ""], ["one", "many"]),
        (["demo", "tokens", "create", "--kind", "=", "m"], ["many"]),  # --kind=m: bash splits at '='
        (["demo", "tokens", "create", "--kind", "one", ""], ["-h", "--help", "--kind", "--out"]),
        (["demo", "tokens", "list", "--kind", ""], ["-h", "--help"]),  # --kind is create's: no value expected
        (["demo", "loss", "n1", ""], ["0", "1", "2"]),
        (["demo", "loss", "n1", "2", ""], ["-h", "--help"]),  # no positional left: the options
        (["demo", "pair", "a", ""], ["a", "b"]),
        (["demo", "pair", "a", "b", ""], ["-h", "--help"]),
        (["demo", "isolate", "n1", "n2", ""], []),  # free text, repeating: nothing to offer, no options either
        (["demo", "exec", "n1", "ls", "-"], []),  # the rest belongs to another command
        (["demo", "exec", "n1", "--", "-"], []),
        (["demo", "bogus", ""], []),  # argparse will refuse it: nothing to offer
        (["demo", "--", "-"], []),  # after --, no options
    ],
)
def test_demo_parser(demo_script: Path, line: list[str], expected: list[str]) -> None:
    assert tab(demo_script, line) == expected


def test_file_and_directory_values(demo_script: Path, tmp_path: Path) -> None:
    (tmp_path / "conf.toml").write_text("")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "other").write_text("")
    assert sorted(tab(demo_script, ["demo", "--config", "co"], cwd=tmp_path)) == ["conf.d", "conf.toml"]
    assert tab(demo_script, ["demo", "tokens", "create", "--out", "co"], cwd=tmp_path) == ["conf.d"]
    assert sorted(tab(demo_script, ["demo", "--lab-dir", ""], cwd=tmp_path)) == ["conf.d"]


def test_dynamic_values_come_from_the_command_with_the_top_level_options_typed(demo_script: Path,
                                                                              tmp_path: Path) -> None:
    # A stand-in `demo` that records how the script called it and answers with two peers.
    calls = tmp_path / "calls"
    _executable(tmp_path, "demo", f'#!/bin/sh\necho "$@" >> {calls}\necho alpha\necho 10.0.0.1\necho "two words"\n')
    # (The real commands never print "two words": is_shell_word drops it. The script keeps one word per line.)
    env = _env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    line = ["demo", "--config", "c.toml", "-v", "ping", "--count", "2", ""]
    assert tab(demo_script, line, env=env) == ["alpha", "10.0.0.1", "two words"]
    assert tab(demo_script, ["demo", "ping", "a"], env=env) == ["alpha"]
    # --count is ping's own option: only the top-level --config goes to the source.
    assert calls.read_text().splitlines() == ["--config c.toml --complete-values peers", "--complete-values peers"]


def test_a_failing_source_offers_nothing_and_says_nothing(demo_script: Path, tmp_path: Path) -> None:
    _executable(tmp_path, "demo", "#!/bin/sh\necho 'Traceback: boom' >&2\nexit 1\n")
    env = _env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert tab(demo_script, ["demo", "ping", ""], env=env) == []


# --- the real commands ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each command's bash script, as `CMD --print-completion bash` prints it."""
    root = tmp_path_factory.mktemp("scripts")
    found = {}
    for command in SCRIPTS:
        proc = subprocess.run([*_entry_point(command), "--print-completion", "bash"], capture_output=True, text=True,
                              timeout=60, env=_env(), cwd="/")
        assert proc.returncode == 0, f"{command} --print-completion bash: {proc.stderr}"
        assert proc.stderr == ""
        found[command] = root / f"{command}.bash"
        found[command].write_text(proc.stdout)
    return found


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_script_is_valid_bash_and_binds_its_command(scripts: dict[str, Path], command: str) -> None:
    check = subprocess.run(["bash", "-n", str(scripts[command])], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert scripts[command].read_text().rstrip().endswith(f" {command}")
    assert "--print-completion" in tab(scripts[command], [command, "--print"])


@pytest.fixture(scope="module")
def zsh_scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each command's zsh script, as `CMD --print-completion zsh` prints it."""
    root = tmp_path_factory.mktemp("zsh")
    found = {}
    for command in SCRIPTS:
        proc = subprocess.run([*_entry_point(command), "--print-completion", "zsh"], capture_output=True, text=True,
                              timeout=60, env=_env(), cwd="/")
        assert proc.returncode == 0, f"{command} --print-completion zsh: {proc.stderr}"
        found[command] = root / f"{command}.zsh"
        found[command].write_text(proc.stdout)
    return found


@needs_zsh
@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_zsh_script_is_valid_zsh(zsh_scripts: dict[str, Path], command: str) -> None:
    assert ZSH is not None
    check = subprocess.run([ZSH, "-n", str(zsh_scripts[command])], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert tab_zsh(zsh_scripts[command], [command, "--print"]) == ["--print-completion"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (["meshctl", ""], ["status", "ping", "rotate-key"]),
        (["meshctl", "-"], ["-h", "--help", "--socket", "--print-completion"]),
        (["meshctl", "--socket", "/tmp/a.sock", "st"], ["status"]),
        (["meshctl", "status", "-"], ["-h", "--help", "--json", "--socket"]),
        (["meshctl", "ping", "beta", "-"], ["-h", "--help", "-c", "--count", "--json", "--socket"]),
        (["meshctl", "--print-completion", ""], ["bash", "zsh"]),
        (["meshvpn-agent", ""], ["run"]),
        (["meshvpn-agent", "--backend", ""], ["auto", "kernel", "userspace", "memory"]),
        (["meshvpn-agent", "run", "--st"], ["--state-dir"]),
        (["meshvpn-agent", "--log-l"], ["--log-level"]),
        (["meshvpn-registrar", ""], ["run", "tokens", "nodes", "credentials", "mosquitto"]),
        (["meshvpn-registrar", "--config", "r.toml", "tokens", ""], ["create", "list", "revoke"]),
        (["meshvpn-registrar", "tokens", "create", "-"],
         ["-h", "--help", "--state-dir", "--reusable", "--ttl", "--uses", "--json"]),
        (["meshvpn-registrar", "nodes", "remove", "n3", "--k"], ["--keep-key"]),
        (["meshvpn-registrar", "credentials", "issue", ""], ["observer"]),
        (["meshvpn-registrar", "mosquitto", ""], ["init"]),
        (["meshvpn-registrar", "run", "--embedded-broker", "--no"], ["--no-tls"]),
        (["meshvpn-broker", ""], ["run", "passwd", "mosquitto-config"]),
        (["meshvpn-broker", "passwd", ""], ["add", "remove"]),
        (["meshchat", ""], ["gui", "send", "listen"]),
        (["meshchat", "send", "--t"], ["--to", "--timeout"]),
        (["meshchat", "listen", "--c"], ["--config", "--count"]),
        (["meshlab", "up", "--broker", ""], ["embedded", "mosquitto"]),
        (["meshlab", "registrar", ""], ["stop", "kill", "start"]),
        (["meshlab", "broker", ""], ["stop", "start"]),
        (["meshlab", "loss", "n1", "10"], ["10", "100"]),
        (["meshlab", "chaos", "--st"], ["--steps"]),
        (["meshlab", "exec", "n1", "--", "meshctl", "-"], []),
    ],
)
def test_real_commands(scripts: dict[str, Path], zsh_scripts: dict[str, Path], line: list[str],
                       expected: list[str]) -> None:
    assert tab(scripts[line[0]], line) == expected
    if ZSH is not None:  # (test_every_zsh_script_is_valid_zsh reports the skip where zsh is missing)
        assert tab_zsh(zsh_scripts[line[0]], line) == expected, "zsh"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="mcomp", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _peer(name: str, ip: str) -> PeerView:
    return PeerView(node_id=f"{name}-id", name=name, mesh_ip=ip, public_key="k", state="active", configured=True)


def _python_command(directory: Path, command: str) -> None:
    # The command as a shell finds it on PATH: the dynamic values are asked of the command being completed.
    code = _entry_point(command)[2]
    _executable(directory, command, f'#!/bin/sh\nexec "{sys.executable}" -c "{code}" "$@"\n')


def test_meshctl_ping_offers_the_agents_peers(scripts: dict[str, Path], zsh_scripts: dict[str, Path],
                                             short_dir: Path) -> None:
    _python_command(short_dir, "meshctl")
    status = AgentStatus(node_id="self", name="self", mesh_ip="100.96.0.1", prefix_len=16, interface="mv0",
                         broker_connected=True, registrar_online=True, membership_revision=1,
                         membership_complete=True, now=time.time(),
                         peers=[_peer("beta", "100.96.0.2"), _peer("gamma", "100.96.0.3")])
    env = _env(PATH=f"{short_dir}{os.pathsep}{os.environ['PATH']}")
    with StubAgent(short_dir / "a.sock", status) as agent:
        by_flag = tab(scripts["meshctl"], ["meshctl", "--socket", agent.socket_path, "ping", ""], env=env)
        by_env = tab(scripts["meshctl"], ["meshctl", "ping", "-c", "2", "100.96.0."],
                     env={**env, "MESHVPN_SOCKET": agent.socket_path})
        after = tab(scripts["meshctl"], ["meshctl", "ping", "--socket", agent.socket_path, "g"], env=env)
        in_zsh = tab_zsh(zsh_scripts["meshctl"], ["meshctl", "--socket", agent.socket_path, "ping", ""],
                         env=env) if ZSH else None
    assert by_flag == ["beta", "100.96.0.2", "gamma", "100.96.0.3"]
    assert by_env == ["100.96.0.2", "100.96.0.3"]
    assert after == ["gamma"], "--socket after the subcommand is passed on too"
    assert in_zsh in (None, by_flag)


def test_meshctl_ping_without_an_agent_offers_nothing_quietly(scripts: dict[str, Path], short_dir: Path) -> None:
    _python_command(short_dir, "meshctl")
    env = _env(PATH=f"{short_dir}{os.pathsep}{os.environ['PATH']}", MESHVPN_SOCKET=str(short_dir / "none.sock"))
    assert tab(scripts["meshctl"], ["meshctl", "ping", ""], env=env) == []  # and nothing on stderr (tab checks)


def test_meshchat_offers_the_peers_mesh_ips(scripts: dict[str, Path], short_dir: Path) -> None:
    _python_command(short_dir, "meshchat")
    status = AgentStatus(node_id="self", name="self", mesh_ip="100.96.0.1", prefix_len=16, interface="mv0",
                         broker_connected=True, registrar_online=True, membership_revision=1,
                         membership_complete=True, now=time.time(),
                         peers=[_peer("beta", "100.96.0.2"), _peer("gamma", "100.96.0.3")])
    env = _env(PATH=f"{short_dir}{os.pathsep}{os.environ['PATH']}")
    script = scripts["meshchat"]
    with StubAgent(short_dir / "a.sock", status) as agent:
        to = tab(script, ["meshchat", "--socket", agent.socket_path, "send", "--to", ""], env=env)
        allow = tab(script, ["meshchat", "listen", "--allow", "100.96.0.3", "--allow", "100.96.0."],
                    env={**env, "MESHVPN_SOCKET": agent.socket_path})
    assert to == ["100.96.0.2", "100.96.0.3"]
    assert allow == ["100.96.0.2", "100.96.0.3"]
    assert tab(script, ["meshchat", "send", "--to", ""], env={**env, "MESHVPN_SOCKET": agent.socket_path}) == []


def test_meshlab_offers_the_labs_nodes(scripts: dict[str, Path], tmp_path: Path) -> None:
    _python_command(tmp_path, "meshlab")
    lab_dir = tmp_path / "lab"
    state = LabState(lab_id="ab1", created_at=1.0, control=ControlRecord(namespace="mlab1-ctl"))
    for i in (1, 2, 10):
        state.nodes[f"n{i}"] = NodeRecord(index=i, name=f"n{i}", namespace=f"mlab1-n{i}", interface=f"mv-ab1-{i}",
                                          underlay_ip=f"10.77.1.{10 + i}")
    LabStore(lab_dir).save(state)
    env = _env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    script = scripts["meshlab"]
    assert tab(script, ["meshlab", "--lab-dir", str(lab_dir), "kill", ""], env=env) == ["n1", "n2", "n10"]
    assert tab(script, ["meshlab", "isolate", "n1", "n"], env={**env, "MESHVPN_LAB_DIR": str(lab_dir)}) == [
        "n1", "n2", "n10"]
    assert tab(script, ["meshlab", "--lab-dir", str(lab_dir), "exec", "c"], env=env) == ["ctl"]
    assert tab(script, ["meshlab", "--lab-dir", str(lab_dir), "logs", "r"], env=env) == ["registrar"]
    assert tab(script, ["meshlab", "--lab-dir", str(tmp_path / "none"), "kill", ""], env=env) == []
