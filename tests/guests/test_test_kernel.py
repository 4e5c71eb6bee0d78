"""Acceptance: the test kernel (guest-kernels/vmlinux-virtio-6.1) boots in `isovisor run`
through its PVH entry and through the 64-bit Linux boot protocol, to the root mount.

There is no disk yet, so each boot ends in "VFS: Unable to mount root fs"; `panic=-1`
makes the panic reboot at once, the guest resets, and isovisor exits 0. Kernel-mode code
is interpreted on this host (a few minutes per boot), so both boots start together, as
two processes, when the module's first test asks for them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from isovisor.memory.layout import EBDA_START, HIGH_MEMORY_START, MiB
from tests.conftest import NO_KVM_REASON, REPO, TEST_KERNEL, TEST_KERNEL_CMDLINE, kvm_usable

pytestmark = [pytest.mark.kvm]

CMDLINE = TEST_KERNEL_CMDLINE  # guest-kernels/README.md
MEMORY = 256 * MiB
# isovisor's own limit. A boot takes about 3 minutes here on a quiet host (two in
# parallel: about 4), but over 13 minutes when the host's 2 cores are shared by ten busy
# processes (measured: load average 10); see docs/STOCK_LINUX.md.
GUEST_TIMEOUT_S = 1500
TEST_TIMEOUT_S = 1800
PROTOCOLS = ("pvh", "linux")


@dataclass
class Boot:
    protocol: str
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    started: float


@dataclass(frozen=True)
class BootResult:
    protocol: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def context(self) -> str:
        tail = "\n".join(self.stdout.splitlines()[-15:])
        return (
            f"--boot-protocol {self.protocol}: exit {self.returncode} after {self.seconds:.0f} s"
            f"\n--- last guest lines ---\n{tail}\n--- stderr ---\n{self.stderr[-2000:]}"
        )


def start_boot(protocol: str, directory: Path) -> Boot:
    out, err = directory / f"{protocol}.out", directory / f"{protocol}.err"
    argv = [
        sys.executable, "-m", "isovisor.cli.main", "run",
        "--kernel", str(TEST_KERNEL), "--boot-protocol", protocol,
        "--memory", "256M", "--cmdline", CMDLINE, "--serial", "stdio",
        "--timeout", str(GUEST_TIMEOUT_S),
    ]
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Boot(protocol, proc, out, err, time.monotonic())


def finish(boot: Boot) -> BootResult:
    try:
        rc = boot.proc.wait(timeout=GUEST_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        boot.proc.kill()
        rc = boot.proc.wait()
    return BootResult(
        boot.protocol, rc, boot.stdout.read_text(errors="replace"),
        boot.stderr.read_text(errors="replace"), time.monotonic() - boot.started,
    )


@pytest.fixture(scope="module")
def boots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Boot]]:
    why = kvm_usable()
    if why is not None:
        pytest.skip(f"{NO_KVM_REASON}: {why}")
    if not TEST_KERNEL.is_file():
        pytest.fail(f"the test kernel {TEST_KERNEL} is missing (see guest-kernels/README.md)")
    directory = tmp_path_factory.mktemp("test-kernel")
    started = {p: start_boot(p, directory) for p in PROTOCOLS}
    yield started
    for boot in started.values():
        if boot.proc.poll() is None:
            boot.proc.kill()
            boot.proc.wait()


def expected_e820_lines() -> list[str]:
    """The map isovisor gives a 256 MiB guest, as Linux prints it."""
    ranges = [
        (0, EBDA_START, "usable"),
        (EBDA_START, HIGH_MEMORY_START, "reserved"),
        (HIGH_MEMORY_START, MEMORY, "usable"),
    ]
    return [f"BIOS-e820: [mem {a:#018x}-{b - 1:#018x}] {kind}" for a, b, kind in ranges]


def check_boot(result: BootResult) -> None:
    lines = [ln.rstrip("\r") for ln in result.stdout.splitlines()]
    ctx = result.context()

    assert lines and lines[0].startswith("Linux version 6.1."), ctx
    assert f"Kernel command line: {CMDLINE}" in lines, ctx

    start = lines.index("BIOS-provided physical RAM map:") if (
        "BIOS-provided physical RAM map:" in lines) else -1
    assert start >= 0, ctx
    e820 = [ln for ln in lines[start + 1 :] if ln.startswith("BIOS-e820:")][:4]
    assert e820 == expected_e820_lines(), ctx

    memory = next((re.match(r"Memory: (\d+)K/(\d+)K available", ln) for ln in lines
                   if ln.startswith("Memory: ")), None)
    assert memory is not None, ctx
    assert 240 * 1024 < int(memory.group(2)) <= MEMORY // 1024, ctx

    panic = [i for i, ln in enumerate(lines) if "VFS: Unable to mount root fs" in ln]
    assert panic, ctx
    # Nothing but the panic's own epilogue after it: the guest rebooted straight away.
    assert len(lines) - panic[-1] <= 4, ctx
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in lines[panic[-1]], ctx

    assert result.returncode == 0, ctx
    stop = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert stop.startswith("isovisor: guest reset"), ctx


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_test_kernel_boots_to_root_mount(protocol: str, boots: dict[str, Boot]) -> None:
    result = finish(boots[protocol])
    print(f"test kernel, --boot-protocol {protocol}: {result.seconds:.0f} s")
    check_boot(result)
