"""The registrar's dynamic security admin answers commands given before its connection is up, or while it is
re-established, instead of failing them (issue 11: at every registrar start the orphan-account check ran
before the admin had connected, was skipped, and the account of an enrollment cut short by a crash stayed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from brokers import MosquittoBroker, start_mosquitto
from polling import wait_for

from meshcontract import access
from meshcontract.transport import BrokerSettings, connect_async, make_client, release
from registrar import accounts, dynsec

MESH = "m1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    if dynsec.plugin_path() is None:
        pytest.skip("Mosquitto's dynamic security plugin is not installed")
    running = start_mosquitto(tmp_path, users={"registrar": "registrar-pw", "orphan": "orphan-pw"}, mesh=MESH)
    assert isinstance(running, MosquittoBroker)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def admin(broker: MosquittoBroker) -> Iterator[tuple[dynsec.DynsecAdmin, mqtt.Client]]:
    """The admin exactly as the registrar's runner makes it: connecting in the background, not waited for."""
    user, password = access.BROKER_ADMIN_USER, broker.admin_password
    settings = BrokerSettings(url=broker.url, username=user, password=password)
    client = make_client(settings, client_id=access.BROKER_ADMIN_USER)
    made = dynsec.DynsecAdmin(client)
    client.reconnect_delay_set(min_delay=0.25, max_delay=2.0)
    connect_async(client, settings)
    try:
        yield made, client
    finally:
        release(client)


def saved_clients(broker: MosquittoBroker) -> set[str]:
    return {c["username"] for c in json.loads(broker.dynsec_file.read_text())["clients"]}


def test_reconcile_right_after_connecting_deletes_the_orphan(broker: MosquittoBroker, admin):
    admin, _ = admin
    # At once, as RegistrarService.start does: nothing has waited for the connection.
    assert accounts.reconcile(accounts.DynsecAccounts(admin, mesh=MESH), members=[]) == ["orphan"]
    assert "orphan" not in saved_clients(broker)


def test_commands_wait_for_the_reconnection(broker: MosquittoBroker, admin):
    admin, client = admin
    assert admin.run([dynsec.list_clients()])[0]["data"]["clients"]
    broker.stop()
    wait_for(lambda: not client.is_connected(), what="the admin saw the broker go")
    broker.start()
    (response,) = admin.run([dynsec.list_clients()])
    assert "orphan" in response["data"]["clients"]
