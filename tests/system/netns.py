"""Network namespaces for system tests: random-suffixed names, veth links, a bridged LAN, guaranteed cleanup.

Usage (root only; call `require_root("ip", "wireguard-go")` first to skip with a printed reason otherwise):

    with NetnsLab() as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, b, "10.77.0.1/24", "10.77.0.2/24")        # a veth pair between two namespaces
        # or: lab.lan({a: "10.77.0.1/24", b: "10.77.0.2/24", c: ...})   # a bridge in a hub namespace
        wg = lab.ifname("wg")                                  # unique on the machine; socket cleaned up
        a.run("ping", "-c1", "10.77.0.2")

Everything a lab creates carries its random suffix, so concurrent test runs never collide, and `close()`
(run by the context manager even when a test fails, and at interpreter exit as a last resort) stops the
processes it started, removes wireguard-go sockets of the interface names it handed out (which stops those
daemons) and deletes its namespaces, which takes their veths and bridges with them.
"""

from __future__ import annotations

import atexit
import importlib.util
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

WIREGUARD_SOCKET_DIR = Path("/var/run/wireguard")


def lab_missing(*tools: str, modules: tuple[str, ...] = ("registrar.cli", "nodeagent.cli")) -> str | None:
    """Why a meshlab test cannot run here (not root, a tool not on PATH, a module of the project missing), or
    None: the lab tests skip with it."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, wireguard-go)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/bootstrap installs it)"
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} not available"
    return None


def require_root(*tools: str) -> None:
    """Skip the calling test, with a reason, unless running as root with every tool in `tools` on PATH."""
    if os.geteuid() != 0:
        pytest.skip("system test needs root (network namespaces)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"system test needs {', '.join(missing)} on PATH")


class Namespace:
    """One network namespace created by a NetnsLab."""

    def __init__(self, lab: NetnsLab, name: str) -> None:
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name})"

    def command(self, *argv: str) -> list[str]:
        """`argv` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in this namespace and wait; output captured as text."""
        return subprocess.run(
            self.command(*argv), capture_output=True, text=True, check=check, timeout=timeout, input=input
        )

    def python(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        """Run this interpreter (`python ARGS`) in this namespace, e.g. python("-m", "wgctl.cli", "show", "wg0")."""
        return self.run(sys.executable, *args, **kwargs)

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        """Start `argv` in this namespace; the lab terminates it on close."""
        proc = subprocess.Popen(self.command(*argv), **kwargs)
        self.lab._processes.append(proc)
        return proc

    def ping(self, address: str, *, count: int = 1, wait: float = 1) -> bool:
        """True if `address` answers a ping from this namespace."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), address]
        return self.run(*argv, check=False, timeout=count * wait + 10).returncode == 0


class NetnsLab:
    """Creates namespaces and links with one random suffix and removes all of it on close()."""

    def __init__(self, *, prefix: str = "t") -> None:
        self.suffix = secrets.token_hex(3)
        self.prefix = prefix
        self.namespaces: list[Namespace] = []
        self._ifnames: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._closed = False
        atexit.register(self.close)

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace(self, role: str) -> Namespace:
        """A new namespace named `<prefix><role>-<suffix>` with its loopback up."""
        name = f"{self.prefix}{role}-{self.suffix}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        ns = Namespace(self, name)
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def ifname(self, role: str) -> str:
        """An interface name unique on the machine (<= 15 chars); its wireguard-go socket is removed on close."""
        name = f"{role[:6]}{self.suffix}{len(self._ifnames)}"
        if len(name) > 15:
            raise ValueError(f"interface name {name!r} too long; use a shorter role")
        self._ifnames.append(name)
        return name

    def link(self, a: Namespace, b: Namespace, address_a: str, address_b: str) -> tuple[str, str]:
        """A veth pair between `a` and `b` with the given CIDR addresses, both ends up. Returns the names."""
        end_a, end_b = self.ifname("va"), self.ifname("vb")
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                end_a,
                "netns",
                a.name,
                "type",
                "veth",
                "peer",
                "name",
                end_b,
                "netns",
                b.name,
            ],
            check=True,
            capture_output=True,
        )
        for ns, end, address in ((a, end_a, address_a), (b, end_b, address_b)):
            ns.run("ip", "addr", "add", address, "dev", end)
            ns.run("ip", "link", "set", end, "up")
        return end_a, end_b

    def lan(self, members: Mapping[Namespace, str]) -> Namespace:
        """One broadcast LAN: a bridge in a new hub namespace, each member attached by a veth with its address."""
        hub = self.namespace("hub")
        bridge = self.ifname("br")
        hub.run("ip", "link", "add", bridge, "type", "bridge")
        hub.run("ip", "link", "set", bridge, "up")
        for ns, address in members.items():
            ipaddress.ip_interface(address)
            inner, outer = self.ifname("ve"), self.ifname("vh")
            subprocess.run(
                [
                    "ip",
                    "link",
                    "add",
                    inner,
                    "netns",
                    ns.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    outer,
                    "netns",
                    hub.name,
                ],
                check=True,
                capture_output=True,
            )
            hub.run("ip", "link", "set", outer, "master", bridge)
            hub.run("ip", "link", "set", outer, "up")
            ns.run("ip", "addr", "add", address, "dev", inner)
            ns.run("ip", "link", "set", inner, "up")
        return hub

    def close(self) -> None:
        """Stop started processes, remove wireguard-go sockets, delete namespaces. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for proc in self._processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for name in self._ifnames:
            # Removing the socket makes wireguard-go exit; otherwise the daemon would keep its namespace alive.
            try:
                (WIREGUARD_SOCKET_DIR / f"{name}.sock").unlink()
            except FileNotFoundError:
                pass
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns.name], check=False, capture_output=True)
        atexit.unregister(self.close)


def running_wireguard_go(ifnames: Sequence[str]) -> list[str]:
    """Those of `ifnames` that still have a wireguard-go process (by its command line), for leak checks."""
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"wireguard-go"):
            alive += [n for n in ifnames if n.encode() in argv[1:]]
    return alive
