"""Choosing a WireGuard backend and the route backend that goes with it."""

from __future__ import annotations

import logging
import os
import shutil

from wgctl.errors import BackendUnavailableError, InvalidConfigError
from wgctl.model import RouteBackend, WireGuardBackend
from wgctl.netlink import genl_family_exists

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "kernel", "userspace", "memory")
KERNEL_FAMILY = "wireguard"  # the kernel module's generic netlink family (wgctl.kernel.WG_GENL_NAME)


def select_backend(
    name: str,
    *,
    wireguard_go: str = "wireguard-go",
    socket_dir: str | os.PathLike[str] | None = None,
) -> WireGuardBackend:
    """The WireGuard backend called `name`.

    "auto" picks the kernel when its wireguard netlink family answers, else wireguard-go when `wireguard_go`
    is on PATH; BackendUnavailableError when neither is there. "memory" is the in-process fake for tests.
    """
    if name not in BACKEND_NAMES:
        raise InvalidConfigError(
            f"unknown WireGuard backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
        )
    if name == "memory":
        from wgctl.memory import InMemoryWireGuard  # the tests' backend: a real node never loads it

        return InMemoryWireGuard()
    if name in ("auto", "kernel"):
        if genl_family_exists(KERNEL_FAMILY):
            # Imported only now: the kernel backend drives the module through pyroute2, which costs ~11 MB
            # and ~0.1 s to import; a node on wireguard-go never loads it.
            from wgctl.kernel import KernelWireGuard

            log.info("using the kernel WireGuard backend")
            return KernelWireGuard()
        if name == "kernel":
            raise BackendUnavailableError("kernel WireGuard requested but the module is not loaded")
    from wgctl.userspace import DEFAULT_SOCKET_DIR, UserspaceWireGuard

    if shutil.which(wireguard_go) is None:
        raise BackendUnavailableError(
            f"no WireGuard backend: the kernel module is not loaded and {wireguard_go} is not on PATH"
        )
    log.info("using the userspace WireGuard backend (%s)", wireguard_go)
    return UserspaceWireGuard(binary=wireguard_go, socket_dir=socket_dir or DEFAULT_SOCKET_DIR)


def routes_for(backend: WireGuardBackend) -> RouteBackend:
    """The route backend matching `backend`: the in-memory backend's own routes, else netlink."""
    from wgctl.memory import InMemoryWireGuard

    if isinstance(backend, InMemoryWireGuard):
        return backend.routes
    from wgctl.routes import NetlinkRoutes

    return NetlinkRoutes()
