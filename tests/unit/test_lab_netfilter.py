"""The nftables script of a node's underlay faults: what each fault drops, and that an empty set removes all."""

import pytest

from meshlab.netfilter import render
from meshlab.state import UnderlayRule


@pytest.mark.parametrize(
    ("rules", "present", "absent"),
    [
        ({}, ["add table inet meshlab", "delete table inet meshlab"], ["chain"]),
        ({"loss": UnderlayRule()}, ["delete table inet meshlab"], ["chain"]),
        ({"control": UnderlayRule(block=["10.77.5.1"])},
         ['iifname "ul0" ip saddr { 10.77.5.1 } drop  # control', 'oifname "ul0" ip daddr { 10.77.5.1 } drop'],
         ["numgen"]),
        ({"isolate": UnderlayRule(block=["10.77.5.0/24"], allow=["10.77.5.14", "10.77.5.13"])},
         ['ip daddr { 10.77.5.0/24 } ip daddr != { 10.77.5.13, 10.77.5.14 } drop'], []),
        ({"loss": UnderlayRule(loss_percent=25)},
         ['iifname "ul0" numgen random mod 100 < 25 drop', 'oifname "ul0" numgen random mod 100 < 25 drop'],
         ["saddr"]),
    ],
)
def test_render(rules, present, absent):
    script = render(rules, ifname="ul0")
    assert script.startswith("add table inet meshlab\ndelete table inet meshlab\n")  # idempotent replace
    for text in present:
        assert text in script
    for text in absent:
        assert text not in script


def test_every_fault_keeps_its_own_rule():
    script = render({"control": UnderlayRule(block=["10.77.5.1"]), "loss": UnderlayRule(loss_percent=5)},
                    ifname="ul0")
    assert script.count("# control") == 2 and script.count("# loss") == 2


def test_rejects_what_is_not_an_address():
    with pytest.raises(ValueError):
        render({"x": UnderlayRule(block=["10.77.5.1; flush ruleset"])}, ifname="ul0")
