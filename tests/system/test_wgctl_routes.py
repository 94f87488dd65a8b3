"""NetlinkRoutes (wgctl's own rtnetlink requests) against a real kernel, inside a throwaway namespace:
idempotent, "exists" is success, and what it sets reads back with `ip` as `ip` itself would have set it."""

from __future__ import annotations

import json

import pytest
from netns import NetnsLab, require_root

pytestmark = pytest.mark.system

# Runs inside the namespace: performs the steps given as JSON on argv[1] and prints each result.
SNIPPET = """
import json, sys
from wgctl.routes import NetlinkRoutes, delete_link, interface_addresses, link_exists
from wgctl.errors import WireGuardError
routes, out = NetlinkRoutes(), []
for op, ifname, arg in json.loads(sys.argv[1]):
    try:
        if op == "addr":
            out.append(routes.ensure_address(ifname, arg))
        elif op == "up":
            out.append(routes.ensure_up(ifname, mtu=arg))
        elif op == "route":
            out.append(routes.ensure_route(ifname, arg))
        elif op == "exists":
            out.append(link_exists(ifname))
        elif op == "delete":
            out.append(delete_link(ifname))
        elif op == "addresses":
            out.append(sorted([a, up] for name, a, up in interface_addresses() if name == ifname))
    except WireGuardError as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab():
    require_root("ip")
    with NetnsLab(prefix="wgr") as lab:
        yield lab


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(
            [("addr", "100.96.9.1/24"), ("addr", "100.96.9.1/24"), ("addr", "100.96.9.1/16")],
            [True, False, True],
            id="address",
        ),
        pytest.param([("up", 1400), ("up", 1400), ("up", 1380)], [True, False, True], id="up-mtu"),
        pytest.param(
            [("addr", "100.96.9.1/24"), ("up", 1420), ("route", "100.96.9.0/24")],
            [True, True, False],
            id="connected-route-counts",
        ),
        pytest.param([("route", "10.88.0.0/16"), ("route", "10.88.1.2/16")], [True, False], id="route"),
        pytest.param([("addr", "fd00:9::1/64"), ("addr", "fd00:9::1/64")], [True, False], id="ipv6-address"),
    ],
)
def test_steps(lab, steps, expected):
    a, b = lab.namespace(f"s{len(lab.namespaces)}"), lab.namespace(f"p{len(lab.namespaces)}")
    end_a, _ = lab.link(a, b, "10.66.0.1/30", "10.66.0.2/30")
    if any(op == "route" for op, _ in steps) and not any(op == "up" for op, _ in steps):
        a.run("ip", "link", "set", end_a, "up")
    plan = [(op, end_a, arg) for op, arg in steps]
    done = a.python("-c", SNIPPET, json.dumps(plan))
    assert json.loads(done.stdout) == expected, done.stderr


def test_route_via_another_interface_is_replaced(lab):
    a, b = lab.namespace("ra"), lab.namespace("rb")
    first, _ = lab.link(a, b, "10.66.1.1/30", "10.66.1.2/30")
    c = lab.namespace("rc")
    second, _ = lab.link(a, c, "10.66.2.1/30", "10.66.2.2/30")
    plan = [
        ("route", first, "10.99.0.0/16"),
        ("route", second, "10.99.0.0/16"),
        ("route", second, "10.99.0.0/16"),
    ]
    done = a.python("-c", SNIPPET, json.dumps(plan))
    assert json.loads(done.stdout) == [True, True, False], done.stderr
    assert f"dev {second}" in a.run("ip", "route", "show", "10.99.0.0/16").stdout


def test_missing_interface_and_delete(lab):
    a, b = lab.namespace("da"), lab.namespace("db")
    end_a, _ = lab.link(a, b, "10.66.3.1/30", "10.66.3.2/30")
    plan = [
        ("addr", "nosuch0", "10.0.0.1/24"),
        ("up", "nosuch0", 1420),
        ("exists", end_a, None),
        ("delete", end_a, None),
        ("delete", end_a, None),
        ("exists", end_a, None),
    ]
    done = a.python("-c", SNIPPET, json.dumps(plan))
    assert json.loads(done.stdout) == [
        "InterfaceNotFoundError",
        "InterfaceNotFoundError",
        True,
        True,
        False,
        False,
    ], done.stderr


def test_interface_addresses_and_what_ip_shows(lab):
    a, b = lab.namespace("ia"), lab.namespace("ib")
    end_a, _ = lab.link(a, b, "10.66.4.1/30", "10.66.4.2/30")
    plan = [
        ("addresses", end_a, None),
        ("addr", end_a, "100.96.4.1/16"),
        ("addr", end_a, "fd00:4::1/64"),
        ("up", end_a, 1380),
        ("route", end_a, "10.90.0.0/16"),
        ("addresses", end_a, None),
    ]
    done = a.python("-c", SNIPPET, json.dumps(plan))
    got = json.loads(done.stdout)
    # The IPv6 link-local address the kernel adds to an up link may or may not be there yet.
    assert [x for x in got[0] if not x[0].startswith("fe80:")] == [["10.66.4.1", True]], done.stderr
    assert got[1:5] == [True, True, True, True], done.stderr
    assert [x for x in got[5] if not x[0].startswith("fe80:")] == [
        ["10.66.4.1", True], ["100.96.4.1", True], ["fd00:4::1", True]
    ], done.stderr
    shown = a.run("ip", "-d", "address", "show", end_a).stdout
    assert "inet 100.96.4.1/16 scope global" in shown and "mtu 1380" in shown and "UP" in shown
    assert "inet6 fd00:4::1/64 scope global" in shown
    route = a.run("ip", "-d", "route", "show", "10.90.0.0/16").stdout
    assert f"unicast 10.90.0.0/16 dev {end_a} proto static scope global" in route


def test_generic_netlink_family_lookup(lab):
    a = lab.namespace("gf")
    snippet = "from wgctl.netlink import genl_family_exists as f; print(f('nlctrl'), f('meshvpn-none'))"
    assert a.python("-c", snippet).stdout.split() == ["True", "False"]
