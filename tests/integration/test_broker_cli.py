"""`meshvpn-broker passwd add/remove` writes the embedded broker's password file; `python -m broker` serves it.

(Mosquitto's accounts live in its dynamic security plugin, managed by the registrar: no password file there.)"""

from __future__ import annotations

import os
import subprocess
import sys

from brokers import ProbeClient, start_embedded

from meshcontract import access


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker", *args], input=stdin, capture_output=True, text=True,
                          timeout=30)


def test_passwd_add_change_remove(tmp_path):
    path = tmp_path / "passwords"
    assert run_cli("--password-file", str(path), "passwd", "add", "n1", "--password", "one").returncode == 0
    # Without --password and without a terminal the password is read from stdin.
    assert run_cli("--password-file", str(path), "passwd", "add", "observer", stdin="two\n").returncode == 0
    entries = access.parse_password_file(path.read_text())
    assert access.verify_password("one", entries["n1"]) and access.verify_password("two", entries["observer"])
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert run_cli("passwd", "add", "n1", "--password", "three", "--password-file", str(path)).returncode == 0
    assert access.verify_password("three", access.parse_password_file(path.read_text())["n1"])
    assert run_cli("--password-file", str(path), "passwd", "remove", "n1").returncode == 0
    assert set(access.parse_password_file(path.read_text())) == {"observer"}
    assert run_cli("--password-file", str(path), "passwd", "remove", "n1").returncode == 1


def test_passwd_refuses_bad_usernames_and_empty_passwords(tmp_path):
    path = str(tmp_path / "passwords")
    assert run_cli("--password-file", path, "passwd", "add", "Bad/Name", "--password", "x").returncode == 2
    assert run_cli("--password-file", path, "passwd", "add", "n1", "--password", "").returncode == 2
    assert run_cli("passwd", "add", "n1", "--password", "x").returncode == 2  # no file given


def test_the_embedded_broker_accepts_a_file_written_by_the_cli(tmp_path):
    with start_embedded(tmp_path, users={}) as broker:
        assert run_cli("--password-file", str(broker.password_file), "passwd", "add", "n1",
                       "--password", "pw").returncode == 0
        client = ProbeClient(broker, client_id="n1", username="n1", password="pw")
        assert client.rc == 0
        client.close()
