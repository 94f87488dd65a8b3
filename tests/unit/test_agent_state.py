"""The state directory: node id, own broker password, epoch, registration, membership, file modes."""

from __future__ import annotations

import stat
from pathlib import Path
from types import MappingProxyType

import pytest

from meshcontract.messages import MemberRecord, MemberState, MeshSettings
from meshcontract.topics import is_valid_id
from nodeagent.errors import StateDirError
from nodeagent.membership import MemberTable
from nodeagent.policy import next_epoch
from nodeagent.statestore import Enrollment, Registration, StateStore, generate_node_id
from wgctl import keys


def test_own_broker_password_created_once_before_use(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.ensure_dir()
    assert store.broker_password() is None and store.enrollment() is None
    own = store.own_broker_password()
    assert len(own) >= 22  # >= 128 bits of token_urlsafe
    assert StateStore(tmp_path / "state").own_broker_password() == own  # survives a restart
    assert stat.S_IMODE((tmp_path / "state" / "broker_password").stat().st_mode) == 0o600
    assert StateStore(tmp_path / "other").broker_password() is None


def test_enrollment_round_trip_and_forgetting(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.ensure_dir()
    enrollment = Enrollment(
        mesh="m", node_id="n1", registrar_url="https://r:8443", broker_url="mqtts://r:8883",
        signing_key="k" * 44, ca_pin="p" * 43,
    )  # fmt: skip
    store.save_enrollment(enrollment, "-----BEGIN CERTIFICATE-----\n")
    assert StateStore(tmp_path / "state").enrollment() == enrollment
    assert store.ca_file.read_text().startswith("-----BEGIN CERTIFICATE")
    (tmp_path / "state" / "enrollment.json").write_text("{broken")
    assert store.enrollment() is None, "an unreadable file means: enroll again"
    store.save_enrollment(enrollment, "ca")
    store.forget_enrollment()
    assert store.enrollment() is None


def test_epoch_persists_and_grows(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.epoch() is None
    epochs = []
    for now_ms in (5_000, 5_000, 4_000):  # the clock stalls, then goes back: epochs still only grow
        epoch = next_epoch(StateStore(tmp_path).epoch(), now_ms=now_ms)
        StateStore(tmp_path).save_epoch(epoch)
        epochs.append(epoch)
    assert epochs == [5_000, 5_001, 5_002]
    (tmp_path / "epoch").write_text("garbage")
    assert store.epoch() is None


def test_node_id_generated_once(tmp_path: Path) -> None:
    first = StateStore(tmp_path).node_id()
    assert is_valid_id(first) and first.startswith("n") and len(first) == 11
    assert StateStore(tmp_path).node_id() == first
    assert StateStore(tmp_path).node_id("fixed") == "fixed"
    assert StateStore(tmp_path).node_id() == "fixed"
    assert len({generate_node_id() for _ in range(100)}) == 100


def test_invalid_stored_node_id(tmp_path: Path) -> None:
    (tmp_path / "node_id").write_text("Not/Valid\n")
    with pytest.raises(StateDirError):
        StateStore(tmp_path).node_id()


def test_secret_files_are_0600(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.ensure_dir()
    key = store.private_key()
    assert store.private_key() == key
    store.save_broker_password("s3cret")
    assert store.broker_password() == "s3cret"
    for name in ("private.key", "broker_password"):
        assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_registration_and_membership_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.registration() is None and store.membership() is None
    settings = MeshSettings(
        mesh="m",
        network="100.96.0.0/16",
        heartbeat_interval_s=2,
        heartbeat_ttl_s=6,
        persistent_keepalive_s=25,
        mtu=1420,
    )
    registration = Registration(mesh_ip="100.96.0.9", prefix_len=16, settings=settings)
    store.save_registration(registration)
    assert store.registration() == registration
    record = MemberRecord(
        node_id="b",
        name="b",
        mesh_ip="100.96.0.2",
        public_key=keys.public_key(keys.generate_private_key()),
        listen_port=51820,
        state=MemberState.ACTIVE,
        revision=3,
        updated_at=1.0,
    )
    membership = MemberTable(revision=3, members=MappingProxyType({"b": record}))
    store.save_membership(membership)
    assert store.membership() == membership
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temporary files"
    (tmp_path / "membership.json").write_text("{torn")
    assert store.membership() is None, "an unreadable file means: wait for the broker, not crash"
