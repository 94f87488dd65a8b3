"""Builds and caches the VM test's guest: a Debian root filesystem image that boots the host's Debian kernel.

The guest is what a fresh Debian 12 server looks like to `compose/install.sh`: debootstrap minbase with
systemd as init and the packages the install and the tests need, nothing of meshvpn. The kernel is the
host's own Debian kernel (package linux-image-amd64: /boot/vmlinuz-*, /boot/initrd.img-*), which has the
WireGuard module; its modules are copied into the image. The only addition is the test's guest agent
(tests/vm/guest_agent.py), started by systemd, which runs the host's commands over a virtio-serial port.

Images are cached under MESHVPN_VM_CACHE (default /var/cache/meshvpn-vm), one directory per recipe: the key
is a hash of the suite, the package list, the kernel's files and the source of this module and the guest
agent, so any change to how the image is made builds a new one, and an unchanged recipe is never rebuilt.
Older images are removed when a new one is built. Concurrent builds of one recipe take turns (a lock file).

    python3 tests/vm/image.py            # build (or find) the image, print its directory
    python3 tests/vm/image.py --force    # rebuild it

Root is needed (debootstrap, device nodes in the image). Every step that fails raises BuildError naming the
step, the command and the tail of its output; a machine that cannot build at all raises Unavailable, which
the test turns into a skip with that reason.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_CACHE = Path("/var/cache/meshvpn-vm")
SUITE = "bookworm"
# What a Debian server that runs meshvpn has, plus what the test drives it with. systemd-sysv makes systemd
# init; udev and kmod load modules (virtio-serial, wireguard); sudo because docs/deploy.md uses it; wireguard-go
# to measure the userspace backend next to the kernel one in the same guest.
PACKAGES = (
    "systemd-sysv", "udev", "kmod", "iproute2", "iputils-ping", "procps", "sudo", "ca-certificates",
    "python3", "python3-venv", "wireguard-tools", "wireguard-go",
)
# Module trees the guest never loads (no sound, GPU, radio or USB in a virtio guest): 40% of the modules' size.
EXCLUDED_MODULES = (
    "kernel/sound", "kernel/drivers/gpu", "kernel/drivers/media", "kernel/drivers/net/wireless",
    "kernel/drivers/infiniband", "kernel/drivers/staging", "kernel/drivers/usb", "kernel/drivers/bluetooth",
    "kernel/net/wireless", "kernel/net/mac80211", "kernel/net/bluetooth",
)
# Free space the image needs beyond the root filesystem: the meshvpn venv, journals, the test's state.
HEADROOM_MB = 1024
# A build needs about this much (staging root, module copy, image, .deb cache) where the cache lives.
MIN_FREE_BYTES = 4 << 30
# Background timers a test guest has no use for; masked so that they cannot load it at a random moment.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "fstrim.timer", "systemd-tmpfiles-clean.timer",
)
GUEST_AGENT = HERE / "guest_agent.py"
GUEST_AGENT_PATH = "/usr/local/lib/meshvpn-vmtest/guest_agent.py"
GUEST_AGENT_UNIT = "meshvpn-vmtest-agent.service"
VIRTIO_PORT_NAME = "org.meshvpn.vmtest"


class Unavailable(Exception):
    """This machine cannot build or boot the image (not root, a tool or the kernel missing, no space)."""


class BuildError(Exception):
    """A build step failed; the message names the step, the command and the end of its output."""


@dataclass(frozen=True)
class Kernel:
    """A host kernel the guest boots: its release, image and initramfs, and its modules directory."""

    release: str
    vmlinuz: Path
    initrd: Path
    modules: Path


@dataclass(frozen=True)
class Image:
    """A built guest image in the cache."""

    directory: Path
    key: str
    kernel_release: str

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.img"

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"


def find_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Kernel:
    """The newest host kernel with an initramfs and the WireGuard module; Unavailable if there is none."""
    candidates = []
    for vmlinuz in boot.glob("vmlinuz-*"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        initrd = boot / f"initrd.img-{release}"
        tree = modules / release
        if initrd.is_file() and any(tree.glob("kernel/drivers/net/wireguard/wireguard.ko*")):
            candidates.append(Kernel(release, vmlinuz, initrd, tree))
    if not candidates:
        raise Unavailable(
            f"no kernel with an initramfs and the wireguard module in {boot} and {modules} "
            "(apt-get install linux-image-amd64)"
        )
    return max(candidates, key=lambda k: k.vmlinuz.stat().st_mtime)


def cache_dir() -> Path:
    """Where images are cached: MESHVPN_VM_CACHE or /var/cache/meshvpn-vm."""
    return Path(os.environ.get("MESHVPN_VM_CACHE") or DEFAULT_CACHE)


def check_host(cache: Path) -> Kernel:
    """The kernel to boot, after checking everything a build needs; Unavailable with the reason otherwise."""
    if os.geteuid() != 0:
        raise Unavailable("building the VM image needs root (debootstrap)")
    missing = [tool for tool in ("debootstrap", "mkfs.ext4", "depmod") if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not found (apt-get install debootstrap e2fsprogs kmod)")
    kernel = find_kernel()
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if free < MIN_FREE_BYTES:
        raise Unavailable(f"{free >> 20} MiB free in {cache}; building the VM image needs {MIN_FREE_BYTES >> 20} MiB")
    return kernel


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recipe(kernel: Kernel) -> dict:
    """Everything the image depends on. Its hash is the cache key. The mirror is not part of it: any mirror
    serves the same suite."""
    return {
        "suite": SUITE,
        "packages": sorted(PACKAGES),
        "kernel": kernel.release,
        "vmlinuz": _digest(kernel.vmlinuz),
        "initrd": _digest(kernel.initrd),
        "builder": _digest(Path(__file__)),
        "guest_agent": _digest(GUEST_AGENT),
    }


def recipe_key(spec: dict) -> str:
    """The cache key of a recipe: 16 hex digits of its canonical JSON's SHA-256."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _step(what: str, argv: list[str], *, timeout: float, log: Callable[[str], None]) -> None:
    """Run one build step; BuildError with `what`, the command and its output's tail if it fails."""
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{what}: `{' '.join(argv)}` did not finish within {timeout:.0f} s") from exc
    except OSError as exc:
        raise BuildError(f"{what}: cannot run `{argv[0]}`: {exc}") from exc
    if proc.returncode != 0:
        raise BuildError(
            f"{what}: `{' '.join(argv)}` exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}"
        )
    log(f"{what}: {time.monotonic() - start:.1f} s")


def _mirror() -> str:
    proc = subprocess.run([str(REPO / "compose" / "debian-mirror")], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise BuildError(f"finding the Debian mirror: compose/debian-mirror failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _unmount_below(path: Path) -> None:
    # debootstrap mounts /proc and /sys in the new root and may leave them behind when it fails; removing the
    # tree must never descend into them.
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)


def _remove_tree(path: Path) -> None:
    if path.exists():
        _unmount_below(path)
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, capture_output=True)


def _guest_files(root: Path) -> None:
    """The guest's own configuration: host name, fstab, the guest agent and its unit, masked timers."""
    (root / "etc/hostname").write_text("meshvpn-vm\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 meshvpn-vm\n::1 localhost\n")
    (root / "etc/fstab").write_text("LABEL=meshvpn-vm / ext4 rw,relatime 0 1\n")
    # A fixed machine id: an empty one would make every boot a "first boot".
    (root / "etc/machine-id").write_text(hashlib.md5(b"meshvpn-vm").hexdigest() + "\n")
    agent = root / GUEST_AGENT_PATH.lstrip("/")
    agent.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GUEST_AGENT, agent)
    units = root / "etc/systemd/system"
    (units / GUEST_AGENT_UNIT).write_text(
        "[Unit]\n"
        "Description=meshvpn VM test: run the host's commands from virtio-serial port " + VIRTIO_PORT_NAME + "\n"
        "\n[Service]\n"
        # The port exists once virtio_console is loaded and the host's port is announced; udev would load the
        # module too, but not necessarily before this starts.
        "ExecStartPre=/sbin/modprobe virtio_console\n"
        f"ExecStart=/usr/bin/python3 {GUEST_AGENT_PATH}\n"
        "Restart=always\nRestartSec=1\n"
        "\n[Install]\nWantedBy=multi-user.target\n"
    )
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / GUEST_AGENT_UNIT).symlink_to(f"/etc/systemd/system/{GUEST_AGENT_UNIT}")
    for unit in MASKED_UNITS:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    # The Debian default lets a minimal guest wait 90 s for devices that never come; fail fast instead.
    conf = root / "etc/systemd/system.conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "meshvpn-vmtest.conf").write_text("[Manager]\nDefaultTimeoutStartSec=30s\n")


def _copy_modules(kernel: Kernel, root: Path, log: Callable[[str], None]) -> None:
    dest = root / "lib/modules" / kernel.release
    start = time.monotonic()
    try:
        shutil.copytree(
            kernel.modules, dest, symlinks=True,
            ignore=lambda d, names: [n for n in names if os.path.relpath(Path(d) / n, kernel.modules) in EXCLUDED_MODULES],
        )
    except OSError as exc:
        raise BuildError(f"copying {kernel.modules} into the image: {exc}") from exc
    # The build/ and source/ links point into the host's headers; the guest has none.
    for link in ("build", "source"):
        (dest / link).unlink(missing_ok=True)
    log(f"copy modules of {kernel.release}: {time.monotonic() - start:.1f} s")
    _step("depmod for the copied modules", ["depmod", "-b", str(root), kernel.release], timeout=120, log=log)


def _slim(root: Path) -> None:
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "usr/share/doc/*",
                    "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*"):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def build(kernel: Kernel, target: Path, *, log: Callable[[str], None]) -> None:
    """Build the image files into `target` (an empty directory on the cache's file system)."""
    root = target / "root"
    debs = target.parent / "debs"
    debs.mkdir(exist_ok=True)
    mirror = _mirror()
    log(f"debootstrap {SUITE} from {mirror}")
    _step(
        f"debootstrap {SUITE} (minbase + {len(PACKAGES)} packages)",
        ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", f"--cache-dir={debs}",
         SUITE, str(root), mirror],
        timeout=900, log=log,
    )
    _guest_files(root)
    _copy_modules(kernel, root, log)
    _slim(root)
    size_mb = _tree_size(root) // (1 << 20) * 5 // 4 + HEADROOM_MB
    _step(
        f"mkfs.ext4 -d ({size_mb} MiB image)",
        ["mkfs.ext4", "-q", "-F", "-L", "meshvpn-vm", "-d", str(root), str(target / "rootfs.img"), f"{size_mb}M"],
        timeout=300, log=log,
    )
    _remove_tree(root)
    shutil.copyfile(kernel.vmlinuz, target / "vmlinuz")
    shutil.copyfile(kernel.initrd, target / "initrd.img")


def ensure_image(*, force: bool = False, log: Callable[[str], None] = print) -> Image:
    """The cached image for the current recipe, built first if it is missing (or `force`)."""
    cache = cache_dir()
    kernel = check_host(cache)
    spec = recipe(kernel)
    key = recipe_key(spec)
    final = cache / key
    with (cache / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force:
            _remove_tree(final)
        if not (final / "recipe.json").is_file():
            staging = cache / f"build-{key}-{os.getpid()}"
            _remove_tree(staging)
            staging.mkdir()
            start = time.monotonic()
            try:
                build(kernel, staging, log=log)
                (staging / "recipe.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
                _remove_tree(final)
                staging.rename(final)
            finally:
                _remove_tree(staging)
            log(f"built VM image {key} in {time.monotonic() - start:.0f} s: {final}")
            _prune(cache, keep=key)
    return Image(final, key, kernel.release)


def _prune(cache: Path, *, keep: str) -> None:
    for entry in cache.iterdir():
        if entry.is_dir() and entry.name not in (keep, "debs") and not entry.name.startswith("build-"):
            _remove_tree(entry)
            (cache / f"{entry.name}.lock").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build or find the meshvpn VM test image")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached image is current")
    args = parser.parse_args(argv)
    try:
        image = ensure_image(force=args.force, log=lambda line: print(f"vm-image: {line}", file=sys.stderr))
    except (Unavailable, BuildError) as exc:
        print(f"vm-image: {exc}", file=sys.stderr)
        return 1
    print(image.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
