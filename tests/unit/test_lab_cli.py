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
        (["demo", "--keep"], {"cmd": "demo", "keep": True}),
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


@pytest.mark.parametrize("argv", [[], ["up", "--broker", "rabbit"], ["broker", "restart"], ["crash"]])
def test_rejects(argv):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
