"""Where nodes sit on the lab's underlay: --nat / --nat-group, roaming targets, the LAN pool, the router's rules."""

import pytest

from meshlab.errors import LabError
from meshlab.plan import LabPlan
from meshlab.state import ControlRecord, LabState, NodeRecord, RouterRecord
from meshlab.topology import (
    PUBLIC_PLACEMENT,
    Placement,
    free_lan_ip,
    layout,
    masqueraded_packets,
    nat_ruleset,
    parse_group,
    parse_node_list,
    parse_target,
    roam_target,
)

PUB, OWN = PUBLIC_PLACEMENT, Placement("nat")


@pytest.mark.parametrize(("text", "names"), [("n2", ["n2"]), ("n2,n3", ["n2", "n3"]), (" n2 , n10 ,", ["n2", "n10"])])
def test_parse_node_list(text, names):
    assert parse_node_list(text) == names


@pytest.mark.parametrize("text", ["", ",", "n0", "x2", "n2,r1", "n2;n3"])
def test_parse_node_list_rejects(text):
    with pytest.raises(LabError):
        parse_node_list(text)


@pytest.mark.parametrize(("text", "group"), [("home:n4,n5", ("home", ["n4", "n5"])),
                                             ("office-2:n1", ("office-2", ["n1"]))])
def test_parse_group(text, group):
    assert parse_group(text) == group


@pytest.mark.parametrize("text", ["home", "home:", ":n4", "Home:n4", "r1:n4", "n3:n4", "public:n4", "nat:n4",
                                  "a-very-long-group-name:n4"])
def test_parse_group_rejects(text):
    with pytest.raises(LabError):
        parse_group(text)


@pytest.mark.parametrize(
    ("nodes", "nat", "groups", "expected"),
    [
        (3, [], [], [PUB, PUB, PUB]),
        (3, ["n2"], [], [PUB, OWN, PUB]),
        (5, ["n2", "n3"], [("home", ["n4", "n5"])], [PUB, OWN, OWN, Placement("group", "home"),
                                                      Placement("group", "home")]),
        (4, [], [("a", ["n1"]), ("b", ["n2", "n4"])], [Placement("group", "a"), Placement("group", "b"), PUB,
                                                        Placement("group", "b")]),
    ],
)
def test_layout(nodes, nat, groups, expected):
    assert layout(nodes, nat=nat, groups=groups) == expected


@pytest.mark.parametrize(
    ("nodes", "nat", "groups", "message"),
    [
        (3, ["n4"], [], "n1..n3"),
        (3, ["n2", "n2"], [], "twice"),
        (3, ["n2"], [("home", ["n2"])], "twice"),
        (3, [], [("home", ["n1"]), ("home", ["n2"])], "given twice"),
        (3, [], [("work", ["n1"]), ("home", ["n1"])], "twice"),
        (3, [], [("r2", ["n1"])], "invalid NAT group"),
    ],
)
def test_layout_rejects(nodes, nat, groups, message):
    with pytest.raises(LabError, match=message):
        layout(nodes, nat=nat, groups=groups)


def _lab() -> LabState:
    """n1 public, n2 behind its own r1, n3 and n4 behind r2 (group home)."""
    plan = LabPlan("ab1")
    st = LabState(lab_id="ab1", created_at=0, control=ControlRecord(namespace=plan.control_ns))
    for index, name in ((1, "r1"), (2, "r2")):
        r = plan.router(index)
        st.routers[name] = RouterRecord(index=index, name=name, namespace=r.namespace, lan_ip=plan.lan_pool[index - 1],
                                        private_subnet=str(r.private_subnet), gateway=r.gateway,
                                        nft_table="meshlab_nat", group="home" if name == "r2" else None)
    for index, router in ((1, None), (2, "r1"), (3, "r2"), (4, "r2")):
        n = plan.node(index)
        address = n.underlay_ip if router is None else plan.router(int(router[1:])).node_address(index)
        st.nodes[n.name] = NodeRecord(index=index, name=n.name, namespace=n.namespace, interface=n.interface,
                                      underlay_ip=address, router=router)
    return st


@pytest.mark.parametrize(("text", "placement"), [("public", PUB), ("nat", OWN), ("r1", Placement("router", "r1")),
                                                 ("home", Placement("router", "r2"))])
def test_parse_target(text, placement):
    assert parse_target(_lab(), text) == placement


@pytest.mark.parametrize("text", ["r9", "office", "n1"])
def test_parse_target_rejects_unknown(text):
    with pytest.raises(LabError, match="no router or NAT group"):
        parse_target(_lab(), text)


@pytest.mark.parametrize(
    ("node", "to", "expected"),
    [
        ("n1", None, PUB),  # a public node gets a new LAN address
        ("n2", None, OWN),  # behind NAT: Wi-Fi at home -> a mobile carrier's NAT, a new router
        ("n2", PUB, PUB),
        ("n1", Placement("router", "r2"), Placement("router", "r2")),
        ("n3", Placement("router", "r1"), Placement("router", "r1")),
    ],
)
def test_roam_target(node, to, expected):
    assert roam_target(_lab().nodes[node], to) == expected


def test_roam_to_the_router_a_node_is_behind_is_refused():
    with pytest.raises(LabError, match="already behind r2"):
        roam_target(_lab().nodes["n3"], Placement("router", "r2"))


def test_free_lan_ip_skips_what_routers_and_roamed_nodes_hold():
    st, plan = _lab(), LabPlan("ab1")
    assert free_lan_ip(plan, st) == plan.lan_pool[2]
    st.nodes["n1"].underlay_ip = plan.lan_pool[2]  # n1 roamed once
    assert free_lan_ip(plan, st) == plan.lan_pool[3]


def test_free_lan_ip_when_the_pool_is_used_up():
    st, plan = _lab(), LabPlan("ab1")
    for i, address in enumerate(plan.lan_pool):
        st.routers[f"x{i}"] = st.routers["r1"].model_copy(update={"name": f"x{i}", "lan_ip": address})
    with pytest.raises(LabError, match="pool"):
        free_lan_ip(plan, st)


def test_nat_ruleset():
    assert nat_ruleset().splitlines() == [
        "add table ip meshlab_nat",
        "delete table ip meshlab_nat",
        "table ip meshlab_nat {",
        "    chain postrouting {",
        "        type nat hook postrouting priority 100; policy accept;",
        '        oifname "wan0" counter masquerade',
        "    }",
        "    chain forward {",
        "        type filter hook forward priority 0; policy drop;",
        "        ct state established,related counter accept",
        '        iifname "lan0" counter accept',
        "    }",
        "    chain input {",
        "        type filter hook input priority 0; policy accept;",
        '        iifname "wan0" meta l4proto udp ct state new counter drop',
        "    }",
        "}",
    ]


@pytest.mark.parametrize(
    ("listing", "packets"),
    [
        ("", 0),
        ('table ip meshlab_nat {\n\tchain postrouting {\n\t\toifname "wan0" counter packets 7 bytes 420 masquerade\n',
         7),
        ('\t\tct state established,related counter packets 90 bytes 9000 accept\n', 0),
    ],
)
def test_masqueraded_packets(listing, packets):
    assert masqueraded_packets(listing) == packets
