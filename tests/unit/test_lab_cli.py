"""meshlab's command line: what each command parses to (no lab is touched)."""

import pytest

from meshlab.cli import build_parser


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["up", "--nodes", "4"], {"cmd": "up", "nodes": 4, "broker": None}),
        (["up", "--nodes", "2", "--broker", "mosquitto", "--id", "ab1"],
         {"cmd": "up", "nodes": 2, "broker": "mosquitto", "id": "ab1"}),
        (["--lab-dir", "/x", "status", "--json"], {"cmd": "status", "json": True, "lab_dir": "/x"}),
        (["exec", "n1", "--", "ping", "-c", "1", "100.96.0.2"],
         {"cmd": "exec", "node": "n1", "argv": ["ping", "-c", "1", "100.96.0.2"]}),
        (["crash", "n3"], {"cmd": "crash", "node": "n3"}),
        (["freeze", "n2"], {"cmd": "freeze", "node": "n2"}),
        (["partition", "n4"], {"cmd": "partition", "node": "n4"}),
        (["broker", "stop"], {"cmd": "broker", "action": "stop"}),
        (["registrar", "start"], {"cmd": "registrar", "action": "start"}),
        (["logs"], {"cmd": "logs", "node": None, "lines": 40}),
        (["logs", "n1", "-n", "5"], {"cmd": "logs", "node": "n1", "lines": 5}),
        (["down", "--id", "ab1"], {"cmd": "down", "id": "ab1"}),
        (["demo", "--keep"], {"cmd": "demo", "keep": True, "id": None}),
        (["demo", "--id", "dm1"], {"cmd": "demo", "keep": False, "id": "dm1"}),
        (["up", "--nodes", "0"], {"cmd": "up", "nodes": 0}),
        (["up", "--nodes", "5", "--nat", "n2,n3", "--nat-group", "home:n4,n5", "--expiry-s", "20"],
         {"cmd": "up", "nodes": 5, "nat": ["n2,n3"], "nat_group": ["home:n4,n5"], "expiry_s": 20.0}),
        (["up", "--nat", "n2", "--nat", "n3", "--nat-group", "a:n4", "--nat-group", "b:n5"],
         {"nat": ["n2", "n3"], "nat_group": ["a:n4", "b:n5"], "expiry_s": None}),
        (["up"], {"nat": [], "nat_group": []}),
        (["roam", "n2"], {"cmd": "roam", "node": "n2", "to": None}),
        (["roam", "n2", "--to", "home"], {"cmd": "roam", "node": "n2", "to": "home"}),
        (["add"], {"cmd": "add", "nat": False, "behind": None}),
        (["add", "--nat"], {"cmd": "add", "nat": True}),
        (["add", "--behind", "r2"], {"cmd": "add", "behind": "r2"}),
        (["ping", "--tcp", "--within", "30"], {"cmd": "ping", "tcp": True, "within": 30.0}),
        (["registrar", "kill"], {"cmd": "registrar", "action": "kill"}),
        (["cut-control", "n3"], {"cmd": "cut-control", "node": "n3"}),
        (["isolate", "n3", "n4"], {"cmd": "isolate", "nodes": ["n3", "n4"]}),
        (["loss", "n3", "20"], {"cmd": "loss", "node": "n3", "percent": 20}),
        (["reinstall", "n4"], {"cmd": "reinstall", "node": "n4"}),
        (["check", "--no-probe", "--limit", "5"], {"cmd": "check", "no_probe": True, "limit": 5.0}),
        (["chaos", "--nodes", "6", "--seed", "3", "--steps", "30", "--json", "r.json"],
         {"cmd": "chaos", "nodes": 6, "seed": 3, "steps": 30, "json": "r.json", "shrink": None}),
        (["chaos", "--replay", "f.json", "--shrink", "4"], {"cmd": "chaos", "replay": "f.json", "shrink": 4}),
    ],
)
def test_parse(argv, expected):
    args = vars(build_parser().parse_args(argv))
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize("argv", [[], ["up", "--broker", "rabbit"], ["broker", "restart"], ["crash"], ["roam"],
                                  ["add", "--nat", "--behind", "r1"]])
def test_rejects(argv):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_expiry_reaches_the_registrar_as_its_own_flag(tmp_path):
    from meshlab.context import LabContext
    from meshlab.controlplane import ControlPlane
    from meshlab.plan import LabPlan
    from meshlab.settings import LabSettings
    from meshlab.state import ControlRecord, LabState
    from meshlab.store import LabStore

    settings = LabSettings(lab_dir=tmp_path)
    control = ControlPlane(LabContext(settings=settings, store=LabStore(tmp_path)))
    st = LabState(lab_id="ab1", created_at=0, control=ControlRecord(namespace="mlab1-ctl"))
    assert "--expiry" not in control._registrar_argv(st, LabPlan("ab1"))
    st.expiry_s = 20.0
    argv = control._registrar_argv(st, LabPlan("ab1"))
    assert argv[argv.index("--expiry") + 1] == "20.0"


@pytest.mark.parametrize(
    ("argv", "settings"),
    [(["up", "--expiry-s", "20"], {"expiry_s": 20.0}), (["up"], {"expiry_s": None})],
)
def test_expiry_is_a_lab_setting(argv, settings, tmp_path):
    from meshlab.cli import _settings

    loaded = _settings(build_parser().parse_args(["--lab-dir", str(tmp_path), *argv]))
    assert {k: getattr(loaded, k) for k in settings} == settings
