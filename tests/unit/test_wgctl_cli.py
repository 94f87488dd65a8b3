"""The wgctl CLI's converge step and its JSON view, on the in-memory backend."""

from __future__ import annotations

import pytest

from wgctl import keys
from wgctl.cli import apply_file, main, peers_from_json, state_to_json
from wgctl.memory import InMemoryWireGuard
from wgctl.model import InterfaceState, PeerConfig, PeerState

PEER = keys.public_key(keys.generate_private_key())
OTHER = keys.public_key(keys.generate_private_key())


def peer_json(key: str, ip: str, **extra) -> dict:
    return {"public_key": key, "allowed_ips": [ip], **extra}


@pytest.fixture
def desired(tmp_path) -> dict:
    key_file = tmp_path / "private.key"
    keys.write_private_key(key_file)
    return {
        "private_key_file": str(key_file),
        "listen_port": 51820,
        "address": "100.96.0.1/24",
        "mtu": 1420,
        "routes": ["10.50.0.0/16"],
        "peers": [peer_json(PEER, "100.96.0.2/32", endpoint="10.0.0.2:51820")],
    }


def test_first_apply_changes_everything_second_nothing(desired):
    backend = InMemoryWireGuard()
    first = apply_file(backend, "wg0", desired)
    assert first == {
        "interface": True,
        "address": True,
        "up": True,
        "routes": ["10.50.0.0/16"],
        "added": [PEER],
        "updated": [],
        "removed": [],
        "changed": True,
    }
    backend.clear_operations()
    second = apply_file(backend, "wg0", desired)
    assert second["changed"] is False and backend.operations == []


@pytest.mark.parametrize(
    ("peers", "added", "updated", "removed"),
    [
        pytest.param([], [], [], [PEER], id="remove"),
        pytest.param([peer_json(PEER, "100.96.0.9/32")], [], [PEER], [], id="update"),
        pytest.param(
            [peer_json(PEER, "100.96.0.2/32", endpoint="10.0.0.2:51820"), peer_json(OTHER, "100.96.0.3/32")],
            [OTHER],
            [],
            [],
            id="add",
        ),
    ],
)
def test_peer_list_is_complete_desired_state(desired, peers, added, updated, removed):
    backend = InMemoryWireGuard()
    apply_file(backend, "wg0", desired)
    result = apply_file(backend, "wg0", {**desired, "peers": peers})
    assert (result["added"], result["updated"], result["removed"]) == (added, updated, removed)


def test_peers_from_json_defaults():
    assert peers_from_json([{"public_key": PEER}]) == {PEER: PeerConfig(PEER, (), None, 0)}


@pytest.mark.parametrize(("handshake", "age"), [(None, None), (990.0, 10.0)])
def test_state_to_json(handshake, age):
    state = InterfaceState(
        "wg0", "pub", 51820, {PEER: PeerState(PEER, ("100.96.0.2/32",), None, 0, handshake)}
    )
    (peer,) = state_to_json(state, now=1000.0)["peers"]
    assert peer["handshake_age"] == age and peer["allowed_ips"] == ["100.96.0.2/32"]


def test_genkey_pubkey(capsys, monkeypatch):
    assert main(["genkey"]) == 0
    private = capsys.readouterr().out.strip()
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(private + "\n"))
    assert main(["pubkey"]) == 0
    assert capsys.readouterr().out.strip() == keys.public_key(private)


def test_bad_apply_file_is_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main(["--backend", "userspace", "apply", "wgnope0", "--json", str(missing)]) == 2
    assert "bad input" in capsys.readouterr().err
