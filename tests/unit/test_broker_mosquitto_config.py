"""broker.mosquitto_config: the one Mosquitto config renderer, and the shipped file that must equal its defaults."""

from __future__ import annotations

import pytest

from broker.mosquitto_config import (
    ALL_LOG_TYPES,
    SHIPPED_CONFIG,
    AnonymousAccess,
    DynsecAuth,
    Listener,
    MosquittoConfig,
    MosquittoLogging,
    TlsFiles,
    render,
)


def options(text: str) -> list[tuple[str, str]]:
    """(key, value) of every option line, in order; comments and blank lines skipped."""
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value))
    return out


def test_shipped_config_is_the_rendered_default():
    # The shipped file is never edited by hand: change MosquittoConfig / render, then regenerate it with
    # `python -m broker mosquitto-config > broker/mosquitto/mosquitto.conf`.
    assert SHIPPED_CONFIG.read_text() == render(MosquittoConfig())


REQUIRED = {
    "per_listener_settings": "false",
    "set_tcp_nodelay": "true",
    "persistence": "false",
    "max_queued_messages": "1000",
    "max_queued_bytes": "67108864",
    "max_packet_size": "4194304",
}
LAB = MosquittoConfig(
    listeners=(Listener("10.77.3.1", 1883),),
    auth=DynsecAuth("/lab/dynamic-security.json", "/usr/lib/plugin.so"),
    run_as="root",
    logging=MosquittoLogging(file="/lab/mosquitto.log", types=ALL_LOG_TYPES, connection_messages=True),
)


@pytest.mark.parametrize(
    ("config", "expected", "absent"),
    [
        (MosquittoConfig(), {"allow_anonymous": "false", "use_username_as_clientid": "true",
                             "plugin_opt_config_file": "/etc/mosquitto/meshvpn/dynamic-security.json",
                             "certfile": "/etc/mosquitto/meshvpn/server.pem",
                             "keyfile": "/etc/mosquitto/meshvpn/server.key"},
         {"user", "log_dest", "log_type", "password_file", "acl_file"}),
        (LAB, {"listener": "1883 10.77.3.1", "plugin": "/usr/lib/plugin.so", "user": "root",
               "log_dest": "file /lab/mosquitto.log", "connection_messages": "true"}, {"certfile", "keyfile"}),
        (MosquittoConfig(auth=AnonymousAccess(), listeners=(Listener("127.0.0.1", 40001),)),
         {"listener": "40001 127.0.0.1", "allow_anonymous": "true", "use_username_as_clientid": "false"},
         {"plugin", "password_file", "acl_file"}),
    ],
    ids=["shipped", "lab", "anonymous"],
)
def test_every_variant_keeps_the_required_settings(config, expected, absent):
    rendered = options(render(config))
    keys = [key for key, _ in rendered]
    single = {key: value for key, value in rendered if keys.count(key) == 1}
    assert {k: single.get(k) for k in REQUIRED} == REQUIRED
    assert {k: single.get(k) for k in expected} == expected
    assert not absent & set(keys)
    repeated = {key for key in keys if keys.count(key) > 1}
    assert repeated <= {"log_type", "listener"}, f"options given twice: {repeated}"


def test_shipped_listeners_tls_for_nodes_plain_only_on_loopback():
    rendered = options(render(MosquittoConfig()))
    blocks: list[list[tuple[str, str]]] = []
    for key, value in rendered:
        if key == "listener":
            blocks.append([])
        if blocks and key in ("listener", "certfile", "keyfile", "tls_version"):
            blocks[-1].append((key, value))
    assert [b[0][1] for b in blocks] == ["8883 0.0.0.0", "1883 127.0.0.1"]
    assert {k for k, _ in blocks[0]} == {"listener", "certfile", "keyfile", "tls_version"}
    assert blocks[1] == [("listener", "1883 127.0.0.1")]


def test_log_types_one_line_each():
    assert [v for k, v in options(render(LAB)) if k == "log_type"] == list(ALL_LOG_TYPES)


@pytest.mark.parametrize(
    "config",
    [
        MosquittoConfig(auth=DynsecAuth("/a\nallow_anonymous true")),
        MosquittoConfig(listeners=(Listener("", 1883),)),
        MosquittoConfig(listeners=(Listener("0.0.0.0", 0),)),
        MosquittoConfig(listeners=()),
        MosquittoConfig(listeners=(Listener("0.0.0.0", 8883, TlsFiles("/c\nallow_anonymous true", "/k")),)),
        MosquittoConfig(run_as="root\nlistener 1 0.0.0.0"),
        MosquittoConfig(max_queued_messages=0),
        MosquittoConfig(max_packet_size=10),
        MosquittoConfig(logging=MosquittoLogging(file="/x\r")),
    ],
    ids=["newline-in-path", "empty-host", "port-0", "no-listener", "newline-in-cert", "newline-in-user",
         "unlimited-queue", "tiny-packets", "cr-in-log-file"],
)
def test_values_mosquitto_would_misread_are_refused(config):
    with pytest.raises(ValueError):
        render(config)
