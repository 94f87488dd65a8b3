"""Backend selection."""

from __future__ import annotations

import shutil

import pytest

from wgctl.backends import routes_for, select_backend
from wgctl.errors import BackendUnavailableError, InvalidConfigError
from wgctl.kernel import kernel_available
from wgctl.memory import InMemoryRoutes, InMemoryWireGuard


def test_memory_backend_with_bound_routes():
    backend = select_backend("memory")
    assert isinstance(backend, InMemoryWireGuard)
    assert isinstance(routes_for(backend), InMemoryRoutes)


def test_unknown_name_is_rejected():
    with pytest.raises(InvalidConfigError):
        select_backend("ebpf")


@pytest.mark.skipif(kernel_available(), reason="kernel WireGuard present: auto would pick it")
@pytest.mark.parametrize(
    ("binary", "expected"),
    [
        pytest.param("wireguard-go", "userspace", id="wireguard-go"),
        pytest.param("no-such-wireguard-go-binary", None, id="nothing-available"),
    ],
)
def test_auto_without_kernel_module(binary, expected):
    if expected == "userspace" and shutil.which(binary) is None:
        pytest.skip("wireguard-go not installed")
    if expected is None:
        with pytest.raises(BackendUnavailableError):
            select_backend("auto", wireguard_go=binary)
    else:
        assert select_backend("auto", wireguard_go=binary).name == expected


@pytest.mark.skipif(kernel_available(), reason="kernel WireGuard present")
def test_kernel_requested_without_module():
    with pytest.raises(BackendUnavailableError):
        select_backend("kernel")


def test_memory_routes_are_one_per_backend():
    backend = select_backend("memory")
    assert routes_for(backend) is routes_for(backend) is backend.routes
