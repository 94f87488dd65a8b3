"""The lab state file round-trips and rejects what it does not know."""

import pytest
from pydantic import ValidationError

from meshlab import state as state_mod
from meshlab.state import ControlRecord, LabState, NodeRecord, ProcessRecord, RouterRecord


def _state():
    st = LabState(lab_id="ab1", created_at=1.5, control=ControlRecord(namespace="mlab1-ctl"))
    for i in (10, 2, 1):
        st.nodes[f"n{i}"] = NodeRecord(index=i, name=f"n{i}", namespace=f"mlab1-n{i}", interface=f"mv-ab1-{i}",
                                       underlay_ip=f"10.77.1.{10 + i}")
    st.nodes["n1"].agent = ProcessRecord(pid=42, start_ticks=7, argv=["meshvpn-agent"], log="/x/agent.log")
    st.nodes["n1"].mesh_ip = "100.96.0.1"
    return st


def test_round_trip():
    st = _state()
    assert state_mod.load(state_mod.dump(st)) == st


def test_nodes_in_index_order():
    assert [n.name for n in _state().ordered_nodes()] == ["n1", "n2", "n10"]


@pytest.mark.parametrize(
    "text",
    ["{}", "not json", '{"lab_id": "ab", "created_at": 0, "control": {"namespace": "x"}, "surprise": 1}',
     '{"version": 2, "lab_id": "ab", "created_at": 0, "control": {"namespace": "x"}}'],
)
def test_bad_files_rejected(text):
    with pytest.raises((ValidationError, ValueError)):
        state_mod.load(text)


def test_round_trip_with_routers_and_expiry():
    st = _state()
    st.expiry_s = 20.0
    st.routers["r1"] = RouterRecord(index=1, name="r1", namespace="mlab1-r1", lan_ip="10.77.1.211",
                                    private_subnet="192.168.1.0/24", gateway="192.168.1.1", nft_table="meshlab_nat",
                                    group="home")
    st.used_router_indices = [1]
    st.nodes["n2"].router, st.nodes["n2"].gateway, st.nodes["n2"].underlay_ip = "r1", "192.168.1.1", "192.168.1.12"
    back = state_mod.load(state_mod.dump(st))
    assert back == st
    assert [n.name for n in back.behind("r1")] == ["n2"] and back.behind("r9") == []


def test_a_state_file_from_before_routers_still_loads():
    text = ('{"version": 1, "lab_id": "ab", "created_at": 0, "control": {"namespace": "mlab-ctl"}, "nodes": '
            '{"n1": {"index": 1, "name": "n1", "namespace": "mlab-n1", "interface": "mv-ab-1", '
            '"underlay_ip": "10.77.1.11"}}}')
    st = state_mod.load(text)
    assert st.routers == {} and st.expiry_s is None
    assert (st.nodes["n1"].router, st.nodes["n1"].gateway) == (None, None)


def test_underlay_faults_round_trip_and_default_empty():
    from meshlab.state import UnderlayRule

    st = _state()
    assert st.nodes["n2"].underlay == {}
    st.nodes["n2"].underlay["loss"] = UnderlayRule(loss_percent=10)
    assert state_mod.load(state_mod.dump(st)) == st
