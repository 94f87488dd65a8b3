"""The in-memory backends behave like WireGuard and the kernel where agents can observe it."""

from __future__ import annotations

import pytest

from wgctl import keys
from wgctl.diff import plan
from wgctl.errors import InterfaceNotFoundError, InvalidKeyError, UapiError, WireGuardError
from wgctl.memory import InMemoryRoutes, InMemoryWireGuard, Operation
from wgctl.model import PeerChanges, PeerConfig

PRIV = keys.generate_private_key()
K = [keys.public_key(keys.generate_private_key()) for _ in range(4)]


@pytest.fixture
def wg() -> InMemoryWireGuard:
    backend = InMemoryWireGuard()
    backend.ensure_interface("wg0", private_key=PRIV, listen_port=51820)
    backend.clear_operations()
    return backend


def peer(i: int, *ips: str, endpoint: str | None = None, keepalive: int = 0) -> PeerConfig:
    return PeerConfig(K[i], tuple(ips) or (f"100.96.0.{i + 2}/32",), endpoint, keepalive)


@pytest.mark.parametrize(
    ("key", "port", "changed", "ops"),
    [
        pytest.param(PRIV, 51820, False, [], id="same"),
        pytest.param(PRIV, 51821, True, ["set_listen_port"], id="port"),
        pytest.param(PRIV, 0, False, [], id="port-0-means-any"),
        pytest.param(keys.generate_private_key(), 51820, True, ["set_private_key"], id="key"),
    ],
)
def test_ensure_interface_reports_changes(wg, key, port, changed, ops):
    assert wg.ensure_interface("wg0", private_key=key, listen_port=port) is changed
    assert [op.kind for op in wg.operations] == ops
    state = wg.read("wg0")
    assert (state.public_key, state.listen_port) == (keys.public_key(key), port or 51820)


def test_create_and_delete_interface():
    wg = InMemoryWireGuard()
    assert wg.ensure_interface("wgx", private_key=PRIV, listen_port=0) is True
    assert wg.interfaces() == ["wgx"]
    wg.delete_interface("wgx")
    wg.delete_interface("wgx")  # absent is fine
    assert [op.kind for op in wg.operations] == ["create_interface", "delete_interface"]
    with pytest.raises(InterfaceNotFoundError):
        wg.read("wgx")


@pytest.mark.parametrize("method", ["read", "apply"])
def test_missing_interface_is_an_error(method):
    wg = InMemoryWireGuard()
    with pytest.raises(InterfaceNotFoundError):
        if method == "read":
            wg.read("nope")
        else:
            wg.apply("nope", PeerChanges())


def test_apply_touches_only_named_peers(wg):
    wg.apply("wg0", PeerChanges(upsert=(peer(0), peer(1), peer(2))))
    wg.clear_operations()
    wg.apply("wg0", PeerChanges(upsert=(peer(1, "100.96.0.33/32"),), remove=(K[2],)))
    assert wg.touched_peers("wg0") == {K[1], K[2]}
    assert wg.operations == [
        Operation("remove_peer", "wg0", K[2]),
        Operation("update_peer", "wg0", K[1]),
    ]
    assert sorted(wg.read("wg0").peers) == sorted([K[0], K[1]])


def test_reapplying_a_plan_touches_nothing(wg):
    desired = {p.public_key: p for p in (peer(0, endpoint="10.0.0.2:51820", keepalive=25), peer(1))}
    wg.apply("wg0", plan(desired, wg.read("wg0").peers))
    wg.clear_operations()
    second = plan(desired, wg.read("wg0").peers)
    assert second.is_empty()
    wg.apply("wg0", second)
    assert wg.operations == []


def test_update_keeps_endpoint_handshake_and_counters(wg):
    wg.apply("wg0", PeerChanges(upsert=(peer(0, endpoint="10.0.0.2:51820"),)))
    wg.simulate_handshake("wg0", K[0], at=1000.0, rx_bytes=10, tx_bytes=20)
    wg.apply("wg0", PeerChanges(upsert=(peer(0, "100.96.0.2/32", "10.9.0.0/16", keepalive=25),)))
    got = wg.read("wg0").peers[K[0]]
    assert got.endpoint == "10.0.0.2:51820"
    assert (got.latest_handshake, got.rx_bytes, got.tx_bytes) == (1000.0, 10, 20)
    assert set(got.allowed_ips) == {"100.96.0.2/32", "10.9.0.0/16"} and got.persistent_keepalive == 25


def test_allowed_ip_moves_to_the_peer_that_claims_it(wg):
    wg.apply("wg0", PeerChanges(upsert=(peer(0, "100.96.0.2/32", "10.0.0.0/24"),)))
    wg.apply("wg0", PeerChanges(upsert=(peer(1, "100.96.0.2/32"),)))
    peers = wg.read("wg0").peers
    assert peers[K[0]].allowed_ips == ("10.0.0.0/24",)
    assert peers[K[1]].allowed_ips == ("100.96.0.2/32",)


def test_allowed_ips_are_stored_canonically(wg):
    wg.apply("wg0", PeerChanges(upsert=(peer(0, "10.1.2.3/24", "10.1.2.0/24", "100.96.0.2"),)))
    assert wg.read("wg0").peers[K[0]].allowed_ips == ("10.1.2.0/24", "100.96.0.2/32")


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        pytest.param(
            PeerChanges(upsert=(PeerConfig("bad", ("1.2.3.4/32",)),)), InvalidKeyError, id="bad-key"
        ),
        pytest.param(
            PeerChanges(upsert=(PeerConfig(K[1], ("1.2.3.999/32",)),)), WireGuardError, id="bad-cidr"
        ),
        pytest.param(
            PeerChanges(upsert=(PeerConfig(K[1], (), None, 70000),)), WireGuardError, id="keepalive"
        ),
        pytest.param(PeerChanges(remove=("bad",)), InvalidKeyError, id="bad-remove-key"),
    ],
)
def test_invalid_apply_changes_nothing(wg, changes, error):
    wg.apply("wg0", PeerChanges(upsert=(peer(0),)))
    before = wg.read("wg0")
    wg.clear_operations()
    mixed = PeerChanges(upsert=(peer(2), *changes.upsert), remove=(K[0], *changes.remove))
    with pytest.raises(error):
        wg.apply("wg0", mixed)
    assert wg.read("wg0") == before and wg.operations == []


def test_removing_an_absent_peer_is_a_noop(wg):
    wg.apply("wg0", PeerChanges(remove=(K[3],)))
    assert wg.operations == [] and wg.apply_calls == 1


def test_fail_next_injects_one_failure(wg):
    wg.fail_next("apply", UapiError("daemon restarting", errno=111))
    with pytest.raises(UapiError):
        wg.apply("wg0", PeerChanges(upsert=(peer(0),)))
    assert wg.read("wg0").peers == {}
    wg.apply("wg0", PeerChanges(upsert=(peer(0),)))
    assert list(wg.read("wg0").peers) == [K[0]]


def test_read_returns_a_snapshot(wg):
    snapshot = wg.read("wg0")
    wg.apply("wg0", PeerChanges(upsert=(peer(0),)))
    assert snapshot.peers == {}


# -- routes ------------------------------------------------------------------------------------------------


@pytest.fixture
def routes(wg) -> InMemoryRoutes:
    return InMemoryRoutes(wg)


@pytest.mark.parametrize(
    ("steps", "results"),
    [
        pytest.param(
            [("addr", "100.96.0.5/16"), ("addr", "100.96.0.5/16")], [True, False], id="address-once"
        ),
        pytest.param(
            [("addr", "100.96.0.5/16"), ("addr", "100.96.0.5/24")], [True, True], id="same-ip-other-prefix"
        ),
        pytest.param([("up", 1420), ("up", 1420)], [True, False], id="up-once"),
        pytest.param([("up", 1420), ("up", 1380)], [True, True], id="mtu-change"),
        pytest.param([("route", "10.8.0.0/16"), ("route", "10.8.1.0/16")], [True, False], id="route-once"),
        pytest.param(
            [("addr", "100.96.0.5/16"), ("up", 1420), ("route", "100.96.0.0/16")],
            [True, True, False],
            id="connected-route-exists",
        ),
        pytest.param(
            [("addr", "100.96.0.5/16"), ("route", "100.96.0.0/16")],
            [True, True],
            id="down-link-no-connected-route",
        ),
    ],
)
def test_route_steps_are_idempotent(routes, steps, results):
    got = []
    for op, arg in steps:
        if op == "addr":
            got.append(routes.ensure_address("wg0", arg))
        elif op == "up":
            got.append(routes.ensure_up("wg0", mtu=arg))
        else:
            got.append(routes.ensure_route("wg0", arg))
    assert got == results


def test_route_via_other_interface_is_replaced(wg, routes):
    wg.ensure_interface("wg1", private_key=PRIV, listen_port=51821)
    assert routes.ensure_route("wg1", "10.8.0.0/16") is True
    assert routes.ensure_route("wg0", "10.8.0.0/16") is True
    assert routes.routes()["10.8.0.0/16"] == "wg0"
    assert [op.kind for op in routes.operations] == ["add_route", "replace_route"]


def test_recreated_interface_starts_bare(wg, routes):
    routes.ensure_address("wg0", "100.96.0.5/16")
    routes.ensure_up("wg0", mtu=1380)
    routes.ensure_route("wg0", "10.8.0.0/16")
    wg.delete_interface("wg0")
    assert routes.routes() == {}
    with pytest.raises(InterfaceNotFoundError):
        routes.ensure_address("wg0", "100.96.0.5/16")
    wg.ensure_interface("wg0", private_key=PRIV, listen_port=51820)
    assert routes.addresses("wg0") == [] and routes.link("wg0") == (False, 1420)
    assert routes.ensure_address("wg0", "100.96.0.5/16") is True


def test_routes_without_wireguard_accept_any_name():
    routes = InMemoryRoutes()
    assert routes.ensure_up("anything", mtu=1420) is True
    assert routes.ensure_address("anything", "10.0.0.1/24") is True
    assert routes.routes() == {"10.0.0.0/24": "anything"}


@pytest.mark.parametrize("bad", ["100.96.0.300/16", "nonsense"])
def test_bad_addresses_are_errors(routes, bad):
    with pytest.raises(WireGuardError):
        routes.ensure_address("wg0", bad)
    with pytest.raises(WireGuardError):
        routes.ensure_route("wg0", bad)


def test_allowed_ip_ownership_follows_updates_and_removals(wg):
    wg.apply("wg0", PeerChanges(upsert=(peer(0, "10.0.0.1/32", "10.0.0.2/32"), peer(1, "10.0.0.3/32"))))
    # Peer 0 gives up 10.0.0.2; peer 1 then claims it without touching peer 0 again.
    wg.apply("wg0", PeerChanges(upsert=(peer(0, "10.0.0.1/32"),)))
    wg.clear_operations()
    wg.apply("wg0", PeerChanges(upsert=(peer(1, "10.0.0.2/32", "10.0.0.3/32"),)))
    assert wg.touched_peers() == {K[1]}
    # After peer 1 is removed, a new peer claims its IPs and nobody else is touched.
    wg.apply("wg0", PeerChanges(remove=(K[1],)))
    wg.clear_operations()
    wg.apply("wg0", PeerChanges(upsert=(peer(2, "10.0.0.2/32"),)))
    assert wg.touched_peers() == {K[2]}
    assert {k: p.allowed_ips for k, p in wg.read("wg0").peers.items()} == {
        K[0]: ("10.0.0.1/32",),
        K[2]: ("10.0.0.2/32",),
    }
