"""AgentSettings loading (file, environment, flags) and endpoint parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcontract.errors import ContractError
from meshcontract.settings import load_settings
from nodeagent.cli import _parser, overrides_from
from nodeagent.errors import SettingsError
from nodeagent.identity import parse_endpoint
from nodeagent.settings import AgentSettings


def test_defaults() -> None:
    settings = load_settings(AgentSettings, environ={})
    assert settings.interface == "meshvpn0"
    assert settings.listen_port == 51820
    assert settings.state_dir == Path("/var/lib/meshvpn")
    assert str(settings.socket_path) == "/run/meshvpn/agent.sock"
    assert settings.socket_mode == 0o600
    assert settings.keep_interface_on_stop is True
    assert settings.reconcile_interval_s == 10
    assert settings.backend == "auto"


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'mesh = "office"\nname = "from-file"\nlisten_port = 1000\nsocket_mode = 0o660\n'
        '[broker]\nurl = "mqtt://10.0.0.1:1883"\n'
    )
    env = {"MESHVPN_NAME": "from-env", "MESHVPN_LISTEN_PORT": "2000", "MESHVPN_BROKER__KEEPALIVE_S": "30"}
    args = _parser().parse_args(["--config", str(config), "--listen-port", "3000", "--endpoint", "192.0.2.1"])
    settings = load_settings(AgentSettings, path=config, environ=env, overrides=overrides_from(args))
    assert settings.mesh == "office"
    assert settings.name == "from-env"
    assert settings.listen_port == 3000
    assert settings.endpoint == "192.0.2.1"
    assert settings.broker.url == "mqtt://10.0.0.1:1883"
    assert settings.broker.keepalive_s == 30
    assert settings.socket_mode == 0o660


@pytest.mark.parametrize(("text", "mode"), [("0660", 0o660), ("660", 0o660), ("0o600", 0o600)])
def test_socket_mode_from_env_is_octal(text: str, mode: int) -> None:
    assert load_settings(AgentSettings, environ={"MESHVPN_SOCKET_MODE": text}).socket_mode == mode


@pytest.mark.parametrize(
    "env",
    [
        {"MESHVPN_MESH": "Bad/Mesh"},
        {"MESHVPN_NODE_ID": "UPPER"},
        {"MESHVPN_BACKEND": "magic"},
        {"MESHVPN_INTERFACE": "a-very-long-interface-name"},
        {"MESHVPN_SOCKET_MODE": "rw-"},
        {"MESHVPN_LISTEN_PORT": "70000"},
    ],
)
def test_invalid_values_name_the_problem(env: dict[str, str]) -> None:
    with pytest.raises(ContractError, match="AgentSettings"):
        load_settings(AgentSettings, environ=env)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("192.0.2.1", "192.0.2.1", 51820),
        ("192.0.2.1:4000", "192.0.2.1", 4000),
        ("node.example.org:5", "node.example.org", 5),
        ("[2001:db8::1]:7", "2001:db8::1", 7),
        ("[2001:db8::1]", "2001:db8::1", 51820),
        ("2001:db8::1", "2001:db8::1", 51820),
    ],
)
def test_parse_endpoint(text: str, host: str, port: int) -> None:
    endpoint = parse_endpoint(text, default_port=51820)
    assert (endpoint.host, endpoint.port) == (host, port)


@pytest.mark.parametrize("text", ["host:notaport", "a b:1", "192.0.2.1:0", ""])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(SettingsError):
        parse_endpoint(text, default_port=51820)
