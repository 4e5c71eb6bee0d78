"""Slow (`make test-slow`): Debian's stock kernel runs userspace against isovisor's devices.

The kernel builds virtio_mmio, virtio_blk and virtio_net as modules, so only userspace can
find our devices: the initramfs `make guest-linux` builds (busybox-static and the kernel's
own modules, isovisor/tools/initramfs.py) loads them in dependency order, mounts the
virtio-blk disk (ext4, made here with a marker file), writes a file back, lists the
network interfaces and resets. Asserted: every step's marker line in order, the marker
read from our disk, the file the guest wrote found in the image afterwards.

Guest userspace cannot run under the stock kernel on a PVM host (docs/STOCK_LINUX.md), so
there the test skips, saying so; the host kind is detected (isovisor.vmm.host), never
assumed. The initramfs itself is tested without booting in tests/tools/test_stock_initramfs.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from isovisor.tools import guest_linux
from isovisor.tools import initramfs as ir
from isovisor.vmm import host
from tests.conftest import NO_KVM_REASON, kvm_usable
from tests.guests.test_stock_linux import boot_until

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

MARKER = "isovisor-disk-marker-7f3a"
CMDLINE = "console=ttyS0 panic=-1 rdinit=/init"
BOUND_S = 900.0


def pvm_skip_reason(info: host.HostInfo) -> str | None:
    """Why the stock kernel's userspace cannot run on this host, or None if it can."""
    if info.kind is host.HostKind.PVM:
        return ("PVM host (kvm_pvm loaded, no VMX/SVM in /proc/cpuinfo): guest userspace "
                "cannot run under Debian's stock kernel here (docs/STOCK_LINUX.md); this "
                "test needs a hardware-virtualization host")
    return None


def disk_image(tmp_path: Path) -> Path:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is missing: the Makefile installs e2fsprogs")
    content = tmp_path / "content"
    content.mkdir()
    (content / ir.DISK_MARKER).write_text(MARKER + "\n")
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)], check=True)
    return image


@pytest.mark.timeout(BOUND_S + 300)
def test_stock_kernel_loads_our_virtio_modules_and_uses_the_disk(tmp_path: Path) -> None:
    why = pvm_skip_reason(host.detect())
    if why is not None:
        pytest.skip(why)
    why = kvm_usable()
    if why is not None:
        pytest.skip(f"{NO_KVM_REASON}: {why}")
    log = lambda msg: print(f"guest-linux: {msg}")  # noqa: E731
    try:
        kernel = guest_linux.ensure_kernel(log=log)
        initrd = guest_linux.ensure_initramfs(guest_linux.DEFAULT_CACHE, kernel, log=log)
    except guest_linux.NetworkError as exc:
        pytest.skip(f"LOUD SKIP: the stock kernel is not cached and cannot be fetched: {exc}")
    image = disk_image(tmp_path)
    # a hardware-virtualization host: none of the PVM workarounds (clearcpuid) apply
    watched = boot_until(
        kernel.vmlinux, "linux", rf"^{ir.MARK} done", BOUND_S,
        extra=("--initrd", str(initrd.path), "--disk", str(image), "--rng"),
        cmdline=CMDLINE,
    )
    ctx = watched.context()
    steps = [f"{ir.MARK} init running",
             *(f"{ir.MARK} loaded {name}" for name in initrd.modules),
             f"{ir.MARK} modules loaded",
             f"{ir.MARK} mounted /dev/vda",
             f"{ir.MARK} marker {MARKER}",
             f"{ir.MARK} unmounted /dev/vda",
             f"{ir.MARK} done"]
    text = watched.text()
    at = []
    for step in steps:
        assert step in text, f"missing {step!r}\n{ctx}"
        at.append(text.index(step))
    assert at == sorted(at), ctx
    assert not [ln for ln in text if "failed" in ln and ln.startswith(ir.MARK)], ctx
    assert watched.first(r"virtio_blk virtio\d+: \[vda\]"), ctx
    if shutil.which("debugfs"):
        wrote = subprocess.run(["debugfs", "-R", f"cat /{ir.GUEST_WROTE}", str(image)],
                               capture_output=True, text=True, check=True).stdout
        assert ir.GUEST_WROTE_TEXT in wrote
