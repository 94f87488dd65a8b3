"""The lab's naming and address plan: unique, short enough for the kernel, derived from the lab id alone."""

import ipaddress

import pytest

from meshlab.errors import LabError
from meshlab.plan import IFNAME_MAX, MAX_NODES, MAX_ROUTERS, LabPlan, check_lab_id, next_index, node_index


@pytest.mark.parametrize("lab_id", ["ab", "a1b2", "zzzzz", "00"])
def test_valid_ids(lab_id):
    assert check_lab_id(lab_id) == lab_id


@pytest.mark.parametrize("lab_id", ["", "a", "abcdef", "AB12", "a-b", "a/b", "a b"])
def test_invalid_ids(lab_id):
    with pytest.raises(LabError):
        check_lab_id(lab_id)


@pytest.mark.parametrize("index", [1, 2, 99, MAX_NODES])
def test_interface_names_fit_the_kernel_limit(index):
    node = LabPlan("zzzzz").node(index)
    assert len(node.interface) <= IFNAME_MAX
    assert len(node.bridge_port) <= IFNAME_MAX
    assert len(LabPlan("zzzzz").bridge) <= IFNAME_MAX


@pytest.mark.parametrize(
    ("index", "name", "namespace", "interface", "host"),
    [(1, "n1", "mlab1-n1", "mv-ab1-1", 11), (4, "n4", "mlab1-n4", "mv-ab1-4", 14), (200, "n200", "mlab1-n200", "mv-ab1-200", 210)],
)
def test_node_plan(index, name, namespace, interface, host):
    plan = LabPlan("ab1")
    node = plan.node(index)
    assert (node.name, node.namespace, node.interface) == (name, namespace, interface)
    assert ipaddress.ip_address(node.underlay_ip) == plan.subnet.network_address + host
    assert node.endpoint == f"{node.underlay_ip}:{51819 + index}"  # a port of its own (meshlab.plan.WG_PORT)


def test_underlay_is_private_and_within_10_77():
    for lab_id in ("ab", "cd", "x9z"):
        plan = LabPlan(lab_id)
        assert plan.subnet.subnet_of(ipaddress.ip_network("10.77.0.0/16"))
        assert ipaddress.ip_address(plan.control_ip) in plan.subnet
        assert plan.broker_url == f"mqtts://{plan.control_ip}:1883"


def test_names_of_different_labs_do_not_collide():
    a, b = LabPlan("aa1"), LabPlan("aa2")
    assert not a.owns_namespace(b.control_ns) and not b.owns_namespace(a.node(1).namespace)
    assert a.node(1).interface != b.node(1).interface
    assert a.owns_namespace(a.control_ns) and a.owns_namespace(a.node(7).namespace)


@pytest.mark.parametrize("index", [0, -1, MAX_NODES + 1])
def test_node_index_out_of_range(index):
    with pytest.raises(LabError):
        LabPlan("ab").node(index)


@pytest.mark.parametrize(("name", "index"), [("n1", 1), ("n12", 12), ("n240", 240)])
def test_node_index(name, index):
    assert node_index(name) == index


@pytest.mark.parametrize("name", ["", "n", "n0", "x1", "n01", "n1a", "node1"])
def test_node_index_rejects(name):
    with pytest.raises(LabError):
        node_index(name)


@pytest.mark.parametrize(("used", "expected"), [([], 1), ([1, 2, 3], 4), ([1, 3], 4), ([5], 6)])
def test_next_index_never_reuses(used, expected):
    assert next_index(used) == expected


@pytest.mark.parametrize(
    ("index", "name", "namespace", "wan_port", "subnet", "gateway"),
    [(1, "r1", "mlab1-r1", "ulr1", "192.168.1.0/24", "192.168.1.1"),
     (254, "r254", "mlab1-r254", "ulr254", "192.168.254.0/24", "192.168.254.1")],
)
def test_router_plan(index, name, namespace, wan_port, subnet, gateway):
    router = LabPlan("ab1").router(index)
    assert (router.name, router.namespace, router.wan_port) == (name, namespace, wan_port)
    assert (str(router.private_subnet), router.gateway) == (subnet, gateway)
    assert len(router.wan_port) <= IFNAME_MAX and len(router.node_port(MAX_NODES)) <= IFNAME_MAX


@pytest.mark.parametrize(("router", "node", "address"), [(1, 1, "192.168.1.11"), (3, 5, "192.168.3.15"),
                                                        (7, MAX_NODES, "192.168.7.210")])
def test_private_address_of_a_node_behind_a_router(router, node, address):
    assert LabPlan("ab1").router(router).node_address(node) == address


@pytest.mark.parametrize("index", [0, MAX_ROUTERS + 1])
def test_router_index_out_of_range(index):
    with pytest.raises(LabError):
        LabPlan("ab").router(index)


def test_lan_pool_is_on_the_lan_and_apart_from_nodes_and_control():
    plan = LabPlan("ab1")
    pool = plan.lan_pool
    nodes = {plan.node(i).underlay_ip for i in range(1, MAX_NODES + 1)}
    assert len(pool) == len(set(pool)) >= 40
    assert all(ipaddress.ip_address(a) in plan.subnet for a in pool)
    assert not nodes & set(pool) and plan.control_ip not in pool
    assert str(plan.subnet.broadcast_address) not in pool
