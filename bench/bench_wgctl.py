"""Benchmarks of the WireGuard control layer.

    python bench/bench_wgctl.py memory [--peers 1000] [--repeat 20]
        plan + apply of N peers on the in-memory backend: first converge, no-op re-plan, 10% churn.
    python bench/bench_wgctl.py userspace [--peers 100] [--repeat 10]      (root, wireguard-go)
        one UAPI set adding N peers, one `get` reading them back, one set updating N, one set removing N,
        on a real wireguard-go in a throwaway network namespace; then the address, link and route checks
        (wgctl.routes) and the whole drift-repair check of an idle agent (nothing to change), wall and CPU.

Prints one line per measurement: name, median and max in milliseconds over --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wgctl import keys  # noqa: E402
from wgctl.diff import plan  # noqa: E402
from wgctl.memory import InMemoryWireGuard  # noqa: E402
from wgctl.model import PeerChanges, PeerConfig  # noqa: E402


def make_peers(n: int, *, generation: int = 0) -> dict[str, PeerConfig]:
    """N desired peers with distinct /32s in 100.96.0.0/16 and endpoints on a 10.x LAN."""
    peers = {}
    for i in range(n):
        key = keys.encode_key(i.to_bytes(4, "big") + bytes(28))
        ip = f"100.96.{(i + 2) // 256}.{(i + 2) % 256}"
        peers[key] = PeerConfig(key, (f"{ip}/32",), f"10.{generation}.{i // 256}.{i % 256}:51820", 25)
    return peers


def timed(
    repeat: int, setup: Callable[[], object], action: Callable[[object], object]
) -> tuple[float, float]:
    """(median, max) milliseconds of `action(setup())` over `repeat` runs; setup is not timed."""
    samples = []
    for _ in range(repeat):
        arg = setup()
        start = time.perf_counter()
        action(arg)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), max(samples)


def timed_cpu(repeat: int, action: Callable[[], object]) -> tuple[float, float]:
    """(median wall, median CPU) milliseconds of `action()` over `repeat` runs: CPU is this process's time."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
    return statistics.median(walls), statistics.median(cpus)


def report_cpu(name: str, result: tuple[float, float]) -> None:
    print(f"{name:55s} median {result[0]:9.3f} ms   CPU  {result[1]:9.3f} ms", flush=True)


def report(name: str, result: tuple[float, float]) -> None:
    print(f"{name:55s} median {result[0]:9.3f} ms   max {result[1]:9.3f} ms", flush=True)


def bench_memory(n: int, repeat: int) -> None:
    desired = make_peers(n)
    private = keys.generate_private_key()

    def fresh() -> InMemoryWireGuard:
        wg = InMemoryWireGuard()
        wg.ensure_interface("wg0", private_key=private, listen_port=51820)
        return wg

    def converge(wg: InMemoryWireGuard) -> None:
        wg.apply("wg0", plan(desired, wg.read("wg0").peers))

    def converged() -> InMemoryWireGuard:
        wg = fresh()
        converge(wg)
        return wg

    report(f"memory: read+plan+apply {n} new peers", timed(repeat, fresh, converge))
    report(f"memory: read+plan {n} converged peers (no-op)", timed(repeat, converged, converge))
    churned = dict(desired)
    for i, key in enumerate(list(churned)[: n // 10]):
        churned[key] = PeerConfig(key, churned[key].allowed_ips, f"10.200.0.{i % 250}:51820", 25)

    def churn(wg: InMemoryWireGuard) -> None:
        wg.apply("wg0", plan(churned, wg.read("wg0").peers))

    report(f"memory: read+plan+apply {n // 10} changed of {n}", timed(repeat, converged, churn))
    actual = converged().read("wg0").peers
    report(
        f"memory: plan only, {n} converged peers",
        timed(repeat, lambda: None, lambda _: plan(desired, actual)),
    )


def bench_userspace(n: int, repeat: int) -> None:
    """Runs inside a namespace (see main): talks to a wireguard-go it starts and deletes."""
    from wgctl.userspace import UserspaceWireGuard

    wg = UserspaceWireGuard()
    ifname = f"wgb{secrets.token_hex(4)}"
    desired = make_peers(n)
    moved = make_peers(n, generation=1)
    try:
        start = time.perf_counter()
        wg.ensure_interface(ifname, private_key=keys.generate_private_key(), listen_port=51820)
        report(
            "userspace: ensure_interface (start wireguard-go)", ((time.perf_counter() - start) * 1000,) * 2
        )

        def empty() -> None:
            current = wg.read(ifname).peers
            wg.apply(ifname, PeerChanges(remove=tuple(current)))

        add = PeerChanges(upsert=tuple(desired.values()))
        report(
            f"userspace: one UAPI set adding {n} peers", timed(repeat, empty, lambda _: wg.apply(ifname, add))
        )
        report(
            f"userspace: one UAPI get of {n} peers", timed(repeat, lambda: None, lambda _: wg.read(ifname))
        )
        report(
            f"userspace: read+plan {n} converged peers (no-op)",
            timed(repeat, lambda: None, lambda _: wg.apply(ifname, plan(desired, wg.read(ifname).peers))),
        )

        def reset() -> None:
            wg.apply(ifname, PeerChanges(upsert=tuple(desired.values())))

        update = PeerChanges(upsert=tuple(moved.values()))
        report(
            f"userspace: one UAPI set updating {n} endpoints",
            timed(repeat, reset, lambda _: wg.apply(ifname, update)),
        )
        remove = PeerChanges(remove=tuple(desired))
        report(
            f"userspace: one UAPI set removing {n} peers",
            timed(repeat, reset, lambda _: wg.apply(ifname, remove)),
        )
        bench_link_checks(wg, ifname, repeat * 20)
    finally:
        wg.delete_interface(ifname)


def bench_link_checks(wg: object, ifname: str, repeat: int) -> None:
    """What an idle agent's drift repair costs when nothing changed (nodeagent.reconciler, every 10 s)."""
    from wgctl.routes import NetlinkRoutes, link_exists

    routes = NetlinkRoutes()
    address, network, mtu = "100.96.0.1/16", "100.96.0.0/16", 1420
    routes.ensure_address(ifname, address)
    routes.ensure_up(ifname, mtu=mtu)
    routes.ensure_route(ifname, network)
    device = wg._device_or_none(ifname)  # type: ignore[attr-defined]
    private_key = device.private_key

    def drift_repair() -> None:
        wg.ensure_interface(ifname, private_key=private_key, listen_port=51820)  # type: ignore[attr-defined]
        routes.ensure_address(ifname, address)
        routes.ensure_up(ifname, mtu=mtu)
        routes.ensure_route(ifname, network)
        wg.read(ifname)  # type: ignore[attr-defined]

    for name, action in (
        ("netlink: link_exists", lambda: link_exists(ifname)),
        ("netlink: ensure_address (already there)", lambda: routes.ensure_address(ifname, address)),
        ("netlink: ensure_up (already up)", lambda: routes.ensure_up(ifname, mtu=mtu)),
        ("netlink: ensure_route (already there)", lambda: routes.ensure_route(ifname, network)),
        ("drift-repair check, nothing to change", drift_repair),
    ):
        report_cpu(name, timed_cpu(repeat, action))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=["memory", "userspace"])
    parser.add_argument("--peers", type=int)
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--inside-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend == "memory":
        bench_memory(args.peers or 1000, args.repeat or 20)
        return 0
    if args.inside_namespace:
        bench_userspace(args.peers or 100, args.repeat or 10)
        return 0
    if os.geteuid() != 0:
        print(
            "the userspace benchmark needs root (it runs wireguard-go in a network namespace)",
            file=sys.stderr,
        )
        return 1
    # Re-run this script inside a throwaway namespace so the TUN device never appears on the host.
    ns = f"wgbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        argv = [sys.executable, __file__, "userspace", "--inside-namespace"]
        argv += ["--peers", str(args.peers or 100), "--repeat", str(args.repeat or 10)]
        return subprocess.run(["ip", "netns", "exec", ns, *argv], check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
