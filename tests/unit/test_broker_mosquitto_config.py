"""broker.mosquitto_config: the one Mosquitto config renderer, and the shipped file that must equal its defaults."""

from __future__ import annotations

import pytest

from broker.mosquitto_config import (
    ALL_LOG_TYPES,
    SHIPPED_CONFIG,
    AnonymousAccess,
    MosquittoConfig,
    MosquittoLogging,
    PasswordFileAuth,
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
    "max_queued_messages": "100000",
    "max_queued_bytes": "67108864",
}
LAB = MosquittoConfig(listen_host="10.77.3.1", auth=PasswordFileAuth("/lab/passwords", "/pkg/acl.conf"),
                      run_as="root", logging=MosquittoLogging(file="/lab/mosquitto.log", types=ALL_LOG_TYPES,
                                                              connection_messages=True))


@pytest.mark.parametrize(
    ("config", "expected", "absent"),
    [
        (MosquittoConfig(), {"listener": "1883 0.0.0.0", "allow_anonymous": "false",
                             "password_file": "/etc/mosquitto/meshvpn/passwords",
                             "acl_file": "/etc/mosquitto/meshvpn/acl.conf", "use_username_as_clientid": "true"},
         {"user", "log_dest", "log_type"}),
        (LAB, {"listener": "1883 10.77.3.1", "password_file": "/lab/passwords", "acl_file": "/pkg/acl.conf",
               "user": "root", "log_dest": "file /lab/mosquitto.log", "connection_messages": "true"}, set()),
        (MosquittoConfig(listen_host="127.0.0.1", listen_port=40001, auth=PasswordFileAuth("/t/pw", None)),
         {"listener": "40001 127.0.0.1", "allow_anonymous": "false", "password_file": "/t/pw"}, {"acl_file"}),
        (MosquittoConfig(auth=AnonymousAccess()), {"allow_anonymous": "true", "use_username_as_clientid": "false"},
         {"password_file", "acl_file"}),
    ],
    ids=["shipped", "lab", "no-acl", "anonymous"],
)
def test_every_variant_keeps_the_required_settings(config, expected, absent):
    rendered = options(render(config))
    keys = [key for key, _ in rendered]
    single = {key: value for key, value in rendered if keys.count(key) == 1}
    assert {k: single.get(k) for k in REQUIRED} == REQUIRED
    assert {k: single.get(k) for k in expected} == expected
    assert not absent & set(keys)
    repeated = {key for key in keys if keys.count(key) > 1}
    assert repeated <= {"log_type"}, f"options given twice: {repeated}"


def test_log_types_one_line_each():
    assert [v for k, v in options(render(LAB)) if k == "log_type"] == list(ALL_LOG_TYPES)


@pytest.mark.parametrize(
    "config",
    [
        MosquittoConfig(auth=PasswordFileAuth("/a\nallow_anonymous true", None)),
        MosquittoConfig(listen_host=""),
        MosquittoConfig(listen_port=0),
        MosquittoConfig(run_as="root\nlistener 1 0.0.0.0"),
        MosquittoConfig(max_queued_messages=0),
        MosquittoConfig(logging=MosquittoLogging(file="/x\r")),
    ],
    ids=["newline-in-path", "empty-host", "port-0", "newline-in-user", "unlimited-queue", "cr-in-log-file"],
)
def test_values_mosquitto_would_misread_are_refused(config):
    with pytest.raises(ValueError):
        render(config)
