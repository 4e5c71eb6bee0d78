"""Acceptance: Linux's own virtio-blk driver against our device, and against QEMU's.

The test kernel (guest-kernels/vmlinux-virtio-6.1) boots with a 16 MiB ext4 image as
root=/dev/vda rw: it must find the disk through our ACPI tables, mount the file system
read-write and start init ("Run /sbin/init"); there is no init, so it panics, reboots at
once (panic=-1), and the VMM exits 0 on the reset. The same kernel, command line and
image run under QEMU microvm with its virtio-blk-device, as the reference: the same lines
must appear there, which shows the assertions test the standard, not our reading of it.

Kernel-mode code is interpreted on this host (a minute or more per boot, more under
load), so both boots start together, as two processes, when the module's first test asks
for them. isovisor runs as a user would run it: `isovisor run --kernel ... --disk IMG`, in
its jailed worker (the host side opens the image); without root, which the jail needs,
with --no-jail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import NO_KVM_REASON, REPO, TEST_KERNEL, kvm_usable

pytestmark = [pytest.mark.kvm]

README_CLEARCPUID = (
    "xsave,avx,avx2,avx512f,popcnt,smap,smep,umip,pku,fsgsbase,rdpid,la57,bmi1,bmi2,movbe,"
    "erms,fsrm,aes,pclmulqdq,sha_ni,adx,rdseed,rdrand,f16c,fma"
)
# The command line of guest-kernels/README.md.
CMDLINE = f"console=ttyS0 root=/dev/vda rw ip=dhcp panic=-1 clearcpuid={README_CLEARCPUID}"
IMAGE_BYTES = 16 << 20
GUEST_TIMEOUT_S = 1200  # each VMM's own limit: 1-5 minutes on a quiet host, 15-20 under load
TEST_TIMEOUT_S = 1380
EXPECTED = (
    "virtio_blk virtio0: [vda] 32768 512-byte logical blocks",
    "EXT4-fs (vda): mounted filesystem",
    "Run /sbin/init",
)
VMMS = ("isovisor", "qemu")


@dataclass
class Boot:
    vmm: str
    proc: subprocess.Popen[bytes]
    image: Path
    stdout: Path
    stderr: Path
    started: float


@dataclass(frozen=True)
class BootResult:
    vmm: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    image: Path

    def context(self) -> str:
        tail = "\n".join(self.stdout.splitlines()[-20:])
        return (f"{self.vmm}: exit {self.returncode} after {self.seconds:.0f} s\n--- last guest "
                f"lines ---\n{tail}\n--- stderr ---\n{self.stderr[-2000:]}")


def make_ext4(path: Path) -> Path:
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    if not os.access(mkfs, os.X_OK):
        pytest.fail("mkfs.ext4 is missing: install e2fsprogs (`make setup` does)")
    with path.open("wb") as f:
        f.truncate(IMAGE_BYTES)
    subprocess.run([mkfs, "-q", "-F", str(path)], check=True, timeout=60)
    return path


def command(vmm: str, image: Path) -> list[str]:
    if vmm == "isovisor":
        jail = [] if os.geteuid() == 0 else ["--no-jail"]
        return [
            sys.executable, "-m", "isovisor.cli.main", "run", *jail,
            "--kernel", str(TEST_KERNEL), "--disk", str(image), "--memory", "256M",
            "--cmdline", CMDLINE, "--serial", "stdio", "--timeout", str(GUEST_TIMEOUT_S),
        ]
    return [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
        "-m", "256", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-no-reboot", "-global", "virtio-mmio.force-legacy=false",
        "-kernel", str(TEST_KERNEL), "-append", CMDLINE,
        "-device", "virtio-blk-device,drive=d0",
        "-drive", f"id=d0,file={image},format=raw,if=none",
    ]


def start_boot(vmm: str, directory: Path) -> Boot:
    image = make_ext4(directory / f"{vmm}.img")
    out, err = directory / f"{vmm}.out", directory / f"{vmm}.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(command(vmm, image), cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=o, stderr=e, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Boot(vmm, proc, image, out, err, time.monotonic())


def finish(boot: Boot) -> BootResult:
    try:
        rc = boot.proc.wait(timeout=GUEST_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        boot.proc.kill()
        rc = boot.proc.wait()
    return BootResult(boot.vmm, rc, boot.stdout.read_text(errors="replace"),
                      boot.stderr.read_text(errors="replace"), time.monotonic() - boot.started,
                      boot.image)


@pytest.fixture(scope="module")
def boots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Boot]]:
    why = kvm_usable()
    if why is not None:
        pytest.skip(f"{NO_KVM_REASON}: {why}")
    if not TEST_KERNEL.is_file():
        pytest.fail(f"the test kernel {TEST_KERNEL} is missing (see guest-kernels/README.md)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run `make setup` (it installs QEMU)")
    directory = tmp_path_factory.mktemp("blk-linux")
    started = {vmm: start_boot(vmm, directory) for vmm in VMMS}
    yield started
    for boot in started.values():
        if boot.proc.poll() is None:
            boot.proc.kill()
            boot.proc.wait()


def mount_count(image: Path) -> int | None:
    """The ext4 superblock's mount count (a read-write mount increments it on disk)."""
    dumpe2fs = shutil.which("dumpe2fs") or "/sbin/dumpe2fs"
    out = subprocess.run([dumpe2fs, "-h", str(image)], capture_output=True, text=True,
                         timeout=60).stdout
    for line in out.splitlines():
        if line.startswith("Mount count:"):
            return int(line.split(":")[1])
    return None


def check(result: BootResult) -> None:
    ctx = result.context()
    lines = [ln.rstrip("\r") for ln in result.stdout.splitlines()]
    positions = []
    for want in EXPECTED:
        found = [i for i, ln in enumerate(lines) if want in ln]
        assert found, f"missing {want!r}\n{ctx}"
        positions.append(found[0])
    assert positions == sorted(positions), ctx  # found the disk, mounted it, then init
    assert not any("I/O error" in ln or "EXT4-fs error" in ln for ln in lines), ctx
    assert result.returncode == 0, ctx
    # The mount really was read-write through the device: the superblock on the host's
    # image records it (mkfs leaves 0).
    assert mount_count(result.image) == 1, ctx


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_linux_mounts_ext4_root_from_isovisor_virtio_blk(boots: dict[str, Boot]) -> None:
    result = finish(boots["isovisor"])
    print(f"test kernel with --disk under isovisor: {result.seconds:.0f} s")
    check(result)
    assert result.stderr.strip().splitlines()[-1].startswith("isovisor: guest reset"), (
        result.context())
    assert "security event" not in result.stderr, result.context()


@pytest.mark.qemu
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_same_boot_under_qemu_microvm(boots: dict[str, Boot]) -> None:
    result = finish(boots["qemu"])
    print(f"test kernel with virtio-blk-device under QEMU microvm: {result.seconds:.0f} s")
    check(result)
