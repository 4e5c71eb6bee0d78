"""Slow (`make test-slow`): Debian's stock cloud kernel, unmodified, in `isovisor run`.

The kernel comes from `python -m isovisor.tools.guest_linux` (fetched when the cache is
empty; skipped loudly without a network). On this PVM host kernel-mode code is
interpreted, so the boot is slow and only its early milestones are asserted here, each
within a time bound; docs/STOCK_LINUX.md records how far it gets and why it stops.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from isovisor.tools import guest_linux
from tests.conftest import NO_KVM_REASON, REPO, TEST_KERNEL_CLEARCPUID, kvm_usable
from tests.guests.test_test_kernel import expected_e820_lines

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

CMDLINE = (
    "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 nokaslr "
    f"clearcpuid={TEST_KERNEL_CLEARCPUID}"
)
# Seconds from launch to "Memory:": measured 66 s on a lightly loaded host, 393-486 s with
# the host overloaded (load average 8-10 on its 2 cores); see docs/STOCK_LINUX.md.
MEMORY_LINE_BOUND_S = 900.0
_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\] ")


@dataclass
class Watched:
    """Guest console lines (printk timestamps stripped) with seconds since launch."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    returncode: int | None = None
    stderr: str = ""

    def first(self, pattern: str) -> tuple[float, str] | None:
        rx = re.compile(pattern)
        return next(((t, ln) for t, ln in self.lines if rx.search(ln)), None)

    def text(self) -> list[str]:
        return [ln for _, ln in self.lines]

    def context(self) -> str:
        tail = "\n".join(f"{t:6.1f}s {ln}" for t, ln in self.lines[-20:])
        return f"exit {self.returncode}\n--- last guest lines ---\n{tail}\n--- stderr ---\n" \
            f"{self.stderr[-2000:]}"


def boot_until(
    kernel: Path, protocol: str, until: str, bound: float, extra: tuple[str, ...] = (),
    cmdline: str = CMDLINE,
) -> Watched:
    """Boot `kernel` and stop it (as a host request) once a line matches `until`, or after
    `bound` seconds. `extra`: more `isovisor run` options."""
    argv = [
        sys.executable, "-m", "isovisor.cli.main", "run", "--kernel", str(kernel),
        "--boot-protocol", protocol, "--memory", "256M", "--cmdline", cmdline,
        "--timeout", str(bound + 30), *extra,
    ]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None and proc.stderr is not None
    lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
    err: list[bytes] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode(errors="replace").rstrip("\r\n")
            lines.put((time.monotonic() - started, _TIMESTAMP.sub("", text)))
        lines.put(None)

    def read_stderr() -> None:
        assert proc.stderr is not None
        err.append(proc.stderr.read())

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=read_stderr, daemon=True)]
    for r in readers:
        r.start()
    watched = Watched()
    target = re.compile(until)
    try:
        while True:
            left = bound - (time.monotonic() - started)
            try:
                item = lines.get(timeout=max(left, 0.1))
            except queue.Empty:
                break
            if item is None:
                break
            watched.lines.append(item)
            if target.search(item[1]):
                break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # isovisor stops the guest: exit 14
        try:
            watched.returncode = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            watched.returncode = proc.wait()
        for r in readers:
            r.join(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
        watched.stderr = b"".join(err).decode(errors="replace")
    return watched


@pytest.fixture(scope="module")
def stock_kernel() -> guest_linux.CachedKernel:
    why = kvm_usable()
    if why is not None:
        pytest.skip(f"{NO_KVM_REASON}: {why}")
    try:
        return guest_linux.ensure_kernel(log=lambda msg: print(f"guest-linux: {msg}"))
    except guest_linux.NetworkError as exc:
        pytest.skip(f"LOUD SKIP: Debian's cloud kernel is not cached and cannot be fetched: {exc}")


@pytest.mark.timeout(MEMORY_LINE_BOUND_S + 300)
def test_stock_vmlinux_boots_to_memory_line(stock_kernel: guest_linux.CachedKernel) -> None:
    watched = boot_until(stock_kernel.vmlinux, "linux", r"^Memory: \d+K/\d+K available",
                         MEMORY_LINE_BOUND_S)
    ctx = watched.context()
    version = watched.first(r"^Linux version ")
    assert version is not None, ctx
    assert stock_kernel.release in version[1], ctx
    assert f"Command line: {CMDLINE}" in watched.text(), ctx

    e820 = [ln for ln in watched.text() if ln.startswith("BIOS-e820:")]
    assert e820 == expected_e820_lines(), ctx

    memory = watched.first(r"^Memory: (\d+)K/(\d+)K available")
    assert memory is not None, f"no 'Memory:' line within {MEMORY_LINE_BOUND_S:.0f} s\n{ctx}"
    total_k = int(re.search(r"/(\d+)K", memory[1]).group(1))  # type: ignore[union-attr]
    assert 240 * 1024 < total_k <= 256 * 1024, ctx
    print(f"stock vmlinux (linux protocol): 'Linux version' at {version[0]:.0f} s, "
          f"'Memory:' at {memory[0]:.0f} s")


# Seconds from launch to SMP bring-up: about 130 s on a lightly loaded host (DESIGN.md).
SMP_BOUND_S = 1500.0


@pytest.mark.timeout(SMP_BOUND_S + 300)
def test_stock_kernel_reads_our_acpi_tables_and_brings_up_every_vcpu(
    stock_kernel: guest_linux.CachedKernel,
) -> None:
    """Debian's kernel builds virtio_mmio as a module (userspace only), so here it proves
    our ACPI tables: it lists RSDP, XSDT, FACP, DSDT and APIC, and starts both vCPUs from
    the MADT (it has no MP-table support)."""
    watched = boot_until(stock_kernel.vmlinux, "linux",
                         r"smpboot: Total of \d+ processors activated", SMP_BOUND_S,
                         extra=("--vcpus", "2"))
    ctx = watched.context()
    for table in ("RSDP", "XSDT", "FACP", "DSDT", "APIC"):
        assert watched.first(rf"^ACPI: {table} 0x[0-9A-F]+"), f"no ACPI {table} line\n{ctx}"
    assert watched.first(r"ACPI: Using ACPI \(MADT\) for SMP configuration"), ctx
    assert watched.first(r"smpboot: Total of 2 processors activated"), ctx

