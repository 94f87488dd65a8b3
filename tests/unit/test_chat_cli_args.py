"""meshchat's command line: shared options before or after the command, gui by default."""

from __future__ import annotations

import pytest

from desktop_chat.cli import parse_args


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"command": "gui", "socket": None, "port": None, "log_level": "WARNING", "log_json": False}),
        (["--socket", "/s"], {"command": "gui", "socket": "/s"}),
        (["--bind", "127.0.0.2", "--port", "9"], {"command": "gui", "bind": "127.0.0.2", "port": 9}),
        (["gui", "--state-dir", "/d"], {"command": "gui", "state_dir": "/d"}),
        (["--socket", "/s", "listen", "--count", "2"], {"command": "listen", "socket": "/s", "count": 2}),
        (["listen", "--json"], {"command": "listen", "json": True, "socket": None}),
        (["listen", "--socket", "/s", "--allow", "1.2.3.4", "--allow", "1.2.3.5"],
         {"command": "listen", "socket": "/s", "allow": ["1.2.3.4", "1.2.3.5"]}),
        (["--name", "gui", "send", "--to", "100.96.0.2", "hello", "there"],
         {"command": "send", "name": "gui", "to": "100.96.0.2", "text": ["hello", "there"], "timeout": None}),
        (["send", "--log-json", "--to", "100.96.0.2", "--timeout", "1.5", "hi"],
         {"command": "send", "log_json": True, "timeout": 1.5}),
    ],
)
def test_parse_args(argv, expected):
    args = parse_args(argv)
    assert {key: getattr(args, key) for key in expected} == expected


@pytest.mark.parametrize("argv", [["send", "hi"], ["listen", "--count", "x"], ["nope"]])
def test_bad_command_lines_exit_2(argv):
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2


@pytest.mark.parametrize(
    ("argv", "env", "socket"),
    [
        (["listen"], {}, "/run/meshvpn/agent.sock"),
        (["listen"], {"MESHVPN_SOCKET": "/lab/n1/agent.sock"}, "/lab/n1/agent.sock"),
        (["send", "--socket", "/flag.sock", "--to", "100.96.0.2", "hi"], {"MESHVPN_SOCKET": "/env.sock"}, "/flag.sock"),
    ],
)
def test_agent_socket_from_flag_then_environment(monkeypatch, argv, env, socket):
    from desktop_chat.cli import _settings

    monkeypatch.delenv("MESHVPN_SOCKET", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _settings(parse_args(argv)).socket == socket
