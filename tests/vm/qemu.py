"""Boots the VM test's guest in QEMU and runs commands in it: the generic harness, nothing of meshvpn.

    with boot(image, workdir=tmp, payload=dir_with_files) as guest:   # payload: read-only disk at /mnt/payload
        result = guest.run(["ip", "-d", "link"], timeout=30)           # rc, stdout, stderr; raises on rc != 0
        guest.write_file("/etc/x.conf", b"...")
        guest.wait_until(["systemctl", "is-active", "x"], timeout=60, what="x active")
        guest.collect_logs(tmp / "logs")                                 # journal, failed units, console

How the host talks to the guest: a virtio-serial port (QEMU chardev on a unix socket in `workdir`) to the
guest agent (tests/vm/guest_agent.py), one JSON request and reply per line. Nothing waits a fixed time: boot
waits for the agent's first reply, with a deadline, and gives up at once when QEMU exits; every command
carries its own timeout, enforced in the guest and, with a margin, on the host.

Acceleration: TCG (emulation) always works. KVM is used where /dev/kvm is usable and a guest actually
starts under it: on some hosts (nested virtualisation) a KVM guest hangs before the kernel prints anything,
so a KVM boot that shows no "Linux version" on the console within KVM_PROBE_S is killed and the boot is
redone with TCG; the verdict is remembered next to the image. MESHVPN_VM_ACCEL=tcg|kvm forces a choice.

QEMU is always killed when the `boot` block ends, whatever happened; its disk writes go to a temporary
snapshot (`snapshot=on`), so the cached image is never modified.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image import VIRTIO_PORT_NAME, Image  # noqa: E402
from polling import wait_for  # noqa: E402

QEMU = "qemu-system-x86_64"
KVM_PROBE_S = 10.0
PAYLOAD_MOUNT = "/mnt/payload"
# Seconds a reply may lag behind a command's own timeout (TCG is slow to fork and to exit).
REPLY_MARGIN_S = 30.0
_PR_SET_PDEATHSIG = 1


class GuestError(Exception):
    """The guest could not be booted or reached; the message carries the end of its console."""


class GuestCommandError(AssertionError):
    """A command in the guest exited non-zero (or timed out) where success was expected."""


@dataclass(frozen=True)
class Result:
    """What a command in the guest did. `rc` is None when its timeout killed it."""

    argv: tuple[str, ...]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def describe(self) -> str:
        status = f"timed out after {self.seconds:.0f} s" if self.rc is None else f"exited {self.rc}"
        return (
            f"guest: `{' '.join(self.argv)}` {status}\n--- stdout ---\n{self.stdout[-4000:]}"
            f"\n--- stderr ---\n{self.stderr[-4000:]}"
        )


class Guest:
    """A booted guest: run commands, move files, wait on conditions, collect logs."""

    def __init__(self, process: subprocess.Popen, channel: socket.socket, console: Path, accel: str) -> None:
        self.process = process
        self.console = console
        self.accel = accel
        self._channel = channel
        self._pending = b""
        self._next_id = 0

    # --- requests --------------------------------------------------------------------------------------
    def _request(self, op: str, *, deadline_s: float, **fields: object) -> dict:
        self._next_id += 1
        request_id = self._next_id
        line = json.dumps({"id": request_id, "op": op, **fields}).encode() + b"\n"
        try:
            self._channel.sendall(line)
        except OSError as exc:
            raise GuestError(f"sending {op} to the guest agent: {exc}\n{self.console_tail()}") from exc
        deadline = time.monotonic() + deadline_s
        while True:
            while b"\n" in self._pending:
                raw, self._pending = self._pending.split(b"\n", 1)
                reply = json.loads(raw)
                if reply.get("id") == request_id:
                    if not reply.get("ok"):
                        raise GuestError(f"guest agent could not {op}: {reply.get('error')}")
                    return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError(f"no reply to {op} from the guest within {deadline_s:.0f} s\n{self.console_tail()}")
            if self.process.poll() is not None:
                raise GuestError(f"QEMU exited ({self.process.returncode}) during {op}\n{self.console_tail()}")
            ready, _, _ = select.select([self._channel], [], [], min(remaining, 1.0))
            if ready:
                chunk = self._channel.recv(1 << 20)
                if not chunk:
                    raise GuestError(f"the guest channel closed during {op}\n{self.console_tail()}")
                self._pending += chunk

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        timeout: float = 60,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        stdin: str = "",
    ) -> Result:
        """Run `argv` (a string runs under `sh -ec`) as root in the guest; GuestCommandError if it fails
        and `check`."""
        args = ("sh", "-ec", argv) if isinstance(argv, str) else tuple(argv)
        reply = self._request(
            "run", deadline_s=timeout + REPLY_MARGIN_S, argv=list(args), timeout=timeout,
            env=dict(env or {}), stdin=stdin,
        )
        result = Result(args, reply["rc"], reply["stdout"], reply["stderr"], reply["seconds"])
        if check and not result.ok:
            raise GuestCommandError(result.describe())
        return result

    def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write `data` to `path` in the guest (atomically, parents created)."""
        raw = data.encode() if isinstance(data, str) else data
        self._request("write", deadline_s=REPLY_MARGIN_S, path=path, data=base64.b64encode(raw).decode(), mode=mode)

    def read_file(self, path: str) -> bytes:
        """The bytes of `path` in the guest."""
        return base64.b64decode(self._request("read", deadline_s=REPLY_MARGIN_S, path=path)["data"])

    def wait_until(
        self, argv: Sequence[str] | str, *, timeout: float, what: str, interval: float = 0.5
    ) -> Result:
        """Re-run `argv` until it exits 0 and return that result; AssertionError naming `what` (and the last
        failure) after `timeout` seconds."""
        last: list[Result] = []

        def attempt() -> Result | None:
            result = self.run(argv, timeout=max(timeout, 5), check=False)
            last[:] = [result]
            return result if result.ok else None

        try:
            return wait_for(attempt, timeout=timeout, what=what, interval=interval)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast attempt: {last[0].describe() if last else 'none'}") from None

    # --- diagnostics -----------------------------------------------------------------------------------
    def console_tail(self, lines: int = 40) -> str:
        """The last lines of the serial console (kernel and systemd messages)."""
        return console_tail(self.console, lines)

    def collect_logs(self, dest: Path, *, units: Sequence[str] = ()) -> None:
        """Copy the console, the journal of this boot and the status of `units` into `dest` (best effort:
        used after failures, so one broken step must not hide the others)."""
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.console, dest / "console.log")
        commands = {
            "journal.txt": ["journalctl", "-b", "--no-pager", "-o", "short-precise"],
            "failed-units.txt": ["systemctl", "--failed", "--no-pager"],
        }
        for unit in units:
            commands[f"status-{unit}.txt"] = ["systemctl", "status", "--no-pager", "-l", "--lines=200", unit]
        for name, argv in commands.items():
            try:
                result = self.run(argv, timeout=60, check=False)
                (dest / name).write_text(result.stdout + result.stderr)
            except GuestError as exc:
                (dest / name).write_text(f"could not collect: {exc}\n")


def console_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a console log, framed for an error message."""
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return "(no console output)"
    tail = "\n".join(text.replace("\r", "").splitlines()[-lines:])
    return f"--- guest console ({path}) ---\n{tail}"


def qemu_available() -> str | None:
    """None if QEMU can run here, else the reason it cannot."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-system-x86)"
    return None


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def _verdict_file(image: Image) -> Path:
    return image.directory.parent / "kvm-verdict.json"


def _remembered_kvm(image: Image) -> bool | None:
    try:
        verdict = json.loads(_verdict_file(image).read_text())
    except (OSError, ValueError):
        return None
    return verdict.get("works") if verdict.get("host") == os.uname().release else None


def _remember_kvm(image: Image, works: bool) -> None:
    _verdict_file(image).write_text(json.dumps({"host": os.uname().release, "works": works}) + "\n")


def _qemu_argv(image: Image, *, accel: str, workdir: Path, payload_image: Path | None,
               memory_mb: int, cpus: int) -> list[str]:
    cpu = "host" if accel == "kvm" else "max"
    argv = [
        QEMU, "-name", "meshvpn-vmtest", "-nodefaults", "-no-reboot",
        "-accel", accel, "-cpu", cpu, "-smp", str(cpus), "-m", str(memory_mb),
        "-kernel", str(image.vmlinuz), "-initrd", str(image.initrd),
        # panic=1 with -no-reboot: a guest kernel panic ends QEMU at once instead of hanging the test.
        # earlyprintk under KVM: the probe then sees "Linux version" within a second of a good start.
        "-append", "root=LABEL=meshvpn-vm rw console=ttyS0 panic=1" + (" earlyprintk=ttyS0" if accel == "kvm" else ""),
        "-drive", f"id=root,file={image.rootfs},if=none,format=raw,snapshot=on",
        "-device", "virtio-blk-pci,drive=root,serial=root",
        "-display", "none", "-monitor", "none", "-serial", f"file:{workdir / 'console.log'}",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=vmtest,path={workdir / 'agent.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=vmtest,name={VIRTIO_PORT_NAME}",
    ]
    if payload_image is not None:
        argv += [
            "-drive", f"id=payload,file={payload_image},if=none,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=payload,serial=payload",
        ]
    return argv


def make_payload_image(source: Path, dest: Path) -> Path:
    """An ext4 image holding the tree `source` (mounted read-only in the guest at /mnt/payload)."""
    size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file() and not p.is_symlink())
    size_mb = size * 3 // 2 // (1 << 20) + 32
    proc = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "payload", "-d", str(source), str(dest), f"{size_mb}M"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise GuestError(f"making the payload disk from {source}: mkfs.ext4 exited {proc.returncode}: {proc.stderr}")
    return dest


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _connect(path: Path, process: subprocess.Popen, console: Path) -> socket.socket:
    def listening() -> bool:
        if process.poll() is not None:
            raise GuestError(f"QEMU exited ({process.returncode}) before it opened {path}\n{console_tail(console)}")
        return path.exists()

    wait_for(listening, timeout=30, what=f"QEMU to create {path}", interval=0.05)
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.connect(str(path))
    return channel


def _kernel_started(console: Path, process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if b"Linux version" in console.read_bytes():
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _start(image: Image, accel: str, workdir: Path, payload_image: Path | None, memory_mb: int, cpus: int,
           log_file: Path) -> subprocess.Popen:
    for stale in ("console.log", "agent.sock"):
        (workdir / stale).unlink(missing_ok=True)
    argv = _qemu_argv(image, accel=accel, workdir=workdir, payload_image=payload_image,
                      memory_mb=memory_mb, cpus=cpus)
    with log_file.open("ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    # If the test process is killed outright (SIGKILL, a CI timeout), no `finally` runs: the kernel then
    # kills QEMU for us, so no guest outlives its test.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextmanager
def boot(
    image: Image,
    *,
    workdir: Path,
    payload: Path | None = None,
    memory_mb: int = 2048,
    cpus: int = 2,
    boot_timeout: float = 300,
    log: Callable[[str], None] = print,
) -> Iterator[Guest]:
    """Boot `image` and yield a Guest once its agent answers and systemd finished starting up.

    `payload`, a directory, becomes a read-only disk mounted at /mnt/payload. QEMU is killed and the
    payload disk removed when the block ends.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    payload_image = make_payload_image(payload, workdir / "payload.img") if payload is not None else None
    qemu_log = workdir / "qemu.log"
    console = workdir / "console.log"
    forced = os.environ.get("MESHVPN_VM_ACCEL", "")
    if forced in ("tcg", "kvm"):
        accel = forced
    elif _kvm_usable() and _remembered_kvm(image) is not False:
        accel = "kvm"
    else:
        accel = "tcg"
    process: subprocess.Popen | None = None
    channel: socket.socket | None = None
    try:
        start = time.monotonic()
        process = _start(image, accel, workdir, payload_image, memory_mb, cpus, qemu_log)
        if accel == "kvm" and not forced:
            works = _kernel_started(console, process, KVM_PROBE_S)
            _remember_kvm(image, works)
            if not works:
                log(f"vm: a KVM guest showed no kernel output within {KVM_PROBE_S:.0f} s; using TCG")
                _stop(process)
                accel = "tcg"
                start = time.monotonic()
                process = _start(image, accel, workdir, payload_image, memory_mb, cpus, qemu_log)
        channel = _connect(workdir / "agent.sock", process, console)
        guest = Guest(process, channel, console, accel)
        try:
            guest._request("ping", deadline_s=boot_timeout)
        except GuestError as exc:
            raise GuestError(f"the guest did not come up ({accel}): {exc}\nQEMU: {_read(qemu_log)}") from exc
        state = guest.run(["systemctl", "is-system-running", "--wait"], timeout=boot_timeout, check=False)
        log(f"vm: booted with {accel} in {time.monotonic() - start:.1f} s (systemd: {state.stdout.strip()})")
        if payload_image is not None:
            guest.run(["mkdir", "-p", PAYLOAD_MOUNT])
            guest.run(["mount", "-o", "ro", "/dev/disk/by-id/virtio-payload", PAYLOAD_MOUNT])
        yield guest
    finally:
        if channel is not None:
            channel.close()
        if process is not None:
            _stop(process)
        if payload_image is not None:
            payload_image.unlink(missing_ok=True)
        (workdir / "agent.sock").unlink(missing_ok=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no output)"
