"""The released artifact works: a wheel of this repository installs into a clean venv and every entry point runs.

This is how people install meshvpn (pip / wheel, docs/deploy.md), so it is tested the same way: build the wheel
from a clean copy of the source (`pip wheel --no-deps`), install it with its dependencies from the package index
(pip's cache keeps that fast) the way
compose/install.sh does it on a server, into a staging root, and ask every console script declared in pyproject.toml for `--help`. The chat
extra (PySide6) is deliberately not installed: `meshchat` must still start and say clearly why it has no GUI.

Marked slow (about half a minute, most of it pip); deselect with `-m "not slow"`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "compose" / "install.sh"
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
COMPLETIONS = "usr/share/bash-completion/completions"
# What a source checkout may hold that must never reach the wheel build (stale modules in build/, the dev venv).
_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
    ".hypothesis", "wheels", "var", ".lab",
)


def _run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The meshvpn wheel, built without dependencies from a clean copy of the working tree."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_IGNORE)
    out = root / "dist"
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
         "--wheel-dir", str(out), str(src)],
        timeout=180,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("meshvpn-*.whl"))
    assert len(wheels) == 1, f"expected one meshvpn wheel, got {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def staging_root(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A staging root filled by compose/install.sh: /opt/meshvpn venv, links, units, configs."""
    root = tmp_path_factory.mktemp("root")
    # As on a host with bash-completion installed: install.sh fills the directory only where it exists.
    (root / COMPLETIONS).mkdir(parents=True)
    proc = _run([str(INSTALL), "--root", str(root), "--wheel", str(wheel)], timeout=240)
    assert proc.returncode == 0, f"install.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return root


@pytest.fixture(scope="module")
def installed(staging_root: Path) -> Path:
    """bin/ of the venv install.sh made (a fresh venv without system site-packages, the wheel and its deps)."""
    return staging_root / "opt/meshvpn/bin"


def _clean_env() -> dict[str, str]:
    # Nothing of the development checkout may leak in: the installed package alone must be enough.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHVPN_", "PYTHON", "VIRTUAL_ENV"))}
    env["QT_QPA_PLATFORM"] = "offscreen"
    return env


def test_wheel_carries_the_packages_and_the_mosquitto_config(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info/" not in n}
    expected = {"meshcontract", "wgctl", "broker", "registrar", "nodeagent", "desktop_chat", "meshlab"}
    assert expected <= tops, f"missing packages: {sorted(expected - tops)}"
    assert "tests" not in tops, "the test suite must not be installed"
    # The Mosquitto role of the container image and docs/deploy.md use the packaged config.
    assert "broker/mosquitto/mosquitto.conf" in names


def test_dependencies_are_consistent(installed: Path) -> None:
    proc = _run([str(installed / "python"), "-m", "pip", "check"], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_entry_point_answers_help(installed: Path, script: str) -> None:
    proc = _run([str(installed / script), "--help"], timeout=60, env=_clean_env())
    assert proc.returncode == 0, f"{script} --help exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "usage" in proc.stdout.lower(), f"{script} --help printed no usage:\n{proc.stdout}"


def test_installed_mosquitto_config_renderer_matches_the_packaged_file(installed: Path) -> None:
    # The container's Mosquitto role renders its config with this command; install.sh copies the packaged file.
    proc = _run([str(installed / "meshvpn-broker"), "mosquitto-config"], timeout=60, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    packaged = _run([str(installed / "python"), "-c",
                     "from broker.mosquitto_config import SHIPPED_CONFIG; print(SHIPPED_CONFIG.read_text(), end='')"],
                    timeout=60, env=_clean_env())
    assert packaged.returncode == 0, packaged.stderr
    assert proc.stdout == packaged.stdout
    assert "max_queued_messages" in proc.stdout


def test_meshchat_without_qt_explains_what_is_missing(installed: Path) -> None:
    probe = _run([str(installed / "python"), "-c", "import PySide6"], timeout=60, env=_clean_env())
    assert probe.returncode != 0, "the clean venv must not have PySide6 (the chat extra is not installed)"
    proc = _run([str(installed / "meshchat"), "gui"], timeout=60, env=_clean_env())
    assert proc.returncode != 0
    assert "PySide6" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_install_script_links_units_and_configs_and_is_idempotent(staging_root: Path, wheel: Path) -> None:
    for script in SCRIPTS:
        link = staging_root / "usr/local/bin" / script
        assert os.readlink(link) == f"/opt/meshvpn/bin/{script}", "links must point at the final location"
    units = staging_root / "etc/systemd/system"
    assert (units / "meshvpn-registrar.service").read_text() == (REPO / "compose/systemd/meshvpn-registrar.service").read_text()
    assert (units / "meshvpn-agent.service").is_file()
    assert (staging_root / "etc/meshvpn/registrar.toml").stat().st_mode & 0o777 == 0o640
    assert (staging_root / "etc/meshvpn/agent.toml").stat().st_mode & 0o777 == 0o600
    # An operator's edit survives a re-run, and a re-run with the same wheel changes nothing.
    config = staging_root / "etc/meshvpn/registrar.toml"
    config.write_text(config.read_text() + "# edited\n")
    again = _run([str(INSTALL), "--root", str(staging_root), "--wheel", str(wheel)], timeout=120)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout, again.stdout
    assert config.read_text().endswith("# edited\n")


def test_install_script_installs_bash_completion_only_where_bash_completion_is(staging_root: Path,
                                                                              wheel: Path) -> None:
    completions = staging_root / COMPLETIONS
    for script in SCRIPTS:
        installed = completions / script
        assert installed.stat().st_mode & 0o777 == 0o644
        printed = _run([str(staging_root / "opt/meshvpn/bin" / script), "--print-completion", "bash"], timeout=60,
                       env=_clean_env())
        assert installed.read_text() == printed.stdout, f"{installed} is not what {script} prints"
        check = _run(["bash", "-n", str(installed)], timeout=30)
        assert check.returncode == 0, check.stderr
    # Without bash-completion nothing is created, and that is no change.
    shutil.rmtree(completions)
    again = _run([str(INSTALL), "--root", str(staging_root), "--wheel", str(wheel)], timeout=120)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout, again.stdout
    assert not completions.exists()
    # Back with the directory: the scripts come back, and only they are written.
    completions.mkdir()
    back = _run([str(INSTALL), "--root", str(staging_root), "--wheel", str(wheel)], timeout=120)
    assert back.returncode == 0, back.stderr
    assert sorted(p.name for p in completions.iterdir()) == sorted(SCRIPTS)
    assert sorted(line for line in back.stdout.splitlines() if line.startswith("install: wrote")) == sorted(
        f"install: wrote {completions / script}" for script in SCRIPTS)
