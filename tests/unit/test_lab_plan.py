"""The lab's naming and address plan: unique, short enough for the kernel, derived from the lab id alone."""

import ipaddress

import pytest

from meshlab.errors import LabError
from meshlab.plan import IFNAME_MAX, MAX_NODES, LabPlan, check_lab_id, next_index, node_index


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
    [(1, "n1", "mlab1-n1", "mv-ab1-1", 11), (4, "n4", "mlab1-n4", "mv-ab1-4", 14), (240, "n240", "mlab1-n240", "mv-ab1-240", 250)],
)
def test_node_plan(index, name, namespace, interface, host):
    plan = LabPlan("ab1")
    node = plan.node(index)
    assert (node.name, node.namespace, node.interface) == (name, namespace, interface)
    assert ipaddress.ip_address(node.underlay_ip) == plan.subnet.network_address + host
    assert node.endpoint == f"{node.underlay_ip}:51820"


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
