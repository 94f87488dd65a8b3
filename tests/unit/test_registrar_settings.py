"""RegistrarSettings' tuning values (will hold, offline doubt, tick interval): defaults, bounds, and the CLI passing
them to the service explicitly."""

from __future__ import annotations

import pytest

from meshcontract.errors import ContractError
from meshcontract.settings import load_settings
from registrar import runner
from registrar.settings import RegistrarSettings


def settings(environ: dict[str, str] | None = None, **overrides) -> RegistrarSettings:
    return load_settings(RegistrarSettings, environ=environ or {}, overrides=overrides)


def test_defaults():
    s = settings()
    assert (s.will_hold_s, s.offline_doubt_s, s.tick_interval_s) == (0.1, 2.0, None)
    assert s.effective_tick_interval_s == 1.0  # TTL 15 s / 5, capped at 1 s


@pytest.mark.parametrize(
    ("overrides", "tick_s"),
    [
        ({"heartbeat_interval_s": 0.3, "heartbeat_ttl_s": 1.0}, 0.2),
        ({"heartbeat_interval_s": 0.05, "heartbeat_ttl_s": 0.1}, 0.05),
        ({"tick_interval_s": 0.5}, 0.5),
    ],
)
def test_effective_tick_interval(overrides, tick_s):
    assert settings(**overrides).effective_tick_interval_s == pytest.approx(tick_s)


def test_from_the_environment():
    s = settings({"MESHVPN_WILL_HOLD_S": "0.25", "MESHVPN_OFFLINE_DOUBT_S": "5", "MESHVPN_TICK_INTERVAL_S": "0.4"})
    assert (s.will_hold_s, s.offline_doubt_s, s.effective_tick_interval_s) == (0.25, 5.0, 0.4)


@pytest.mark.parametrize(
    "overrides",
    [
        {"will_hold_s": -0.1},
        {"will_hold_s": 6},
        {"offline_doubt_s": -1},
        {"offline_doubt_s": 61},
        {"tick_interval_s": 0},
        {"tick_interval_s": 15.0},  # not below the TTL: liveness must be judged several times per TTL
    ],
)
def test_out_of_bounds_is_refused(overrides):
    with pytest.raises(ContractError):
        settings(**overrides)


class _Stop(Exception):
    pass


def test_run_passes_them_to_the_service(tmp_path, monkeypatch):
    seen = {}

    class Recording:
        def __init__(self, **kwargs) -> None:
            seen.update(kwargs)

        def start(self) -> None:
            raise _Stop  # what was passed is all this test wants

        def stop(self) -> None:
            pass

    monkeypatch.setattr("registrar.service.RegistrarService", Recording)
    s = settings(
        state_dir=str(tmp_path), http_listen="", will_hold_s=0.3, offline_doubt_s=4.0, tick_interval_s=0.7,
        broker={"url": "mqtt://127.0.0.1:1", "password": "pw"},
    )  # fmt: skip
    with pytest.raises(_Stop):
        runner.run(s)
    assert (seen["will_hold_s"], seen["offline_doubt_s"], seen["tick_interval_s"]) == (0.3, 4.0, 0.7)
    assert (seen["publish_window_s"], seen["publish_max_delay_s"]) == (0.2, 1.0)
