"""Acceptance: Linux's own virtio-net driver (the test kernel, guest-kernels/vmlinux-virtio-6.1)
gets a DHCP lease through our device, and through QEMU microvm's, from a dnsmasq on the
other end of a TAP.

Each VMM gets a network namespace of its own holding the TAP (addressed 10.201.0.1/24)
and a DHCP-only dnsmasq bound to it; the VMM runs inside that namespace, so the guest can
reach nothing else. isovisor runs as `isovisor run` does by default, in its jailed worker
(nsenter switches only the network namespace: the jail needs the host's /sys). The kernel
configures eth0 with `ip=dhcp`, then finds no root disk ("VFS: Unable to mount root fs"),
panics and, with panic=-1, resets: both VMMs exit 0. Kernel-mode code is interpreted on
this host (minutes per boot), so both boots start together, as two processes, when the
module's first test asks for them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import NO_KVM_REASON, REPO, TEST_KERNEL, kvm_usable
from tests.devices.virtio.netns import NetNs, namespaces_left

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]

README_CLEARCPUID = (
    "xsave,avx,avx2,avx512f,popcnt,smap,smep,umip,pku,fsgsbase,rdpid,la57,bmi1,bmi2,movbe,"
    "erms,fsrm,aes,pclmulqdq,sha_ni,adx,rdseed,rdrand,f16c,fma"
)
# The command line of guest-kernels/README.md.
CMDLINE = f"console=ttyS0 root=/dev/vda rw ip=dhcp panic=-1 clearcpuid={README_CLEARCPUID}"
TAP = "isvtap0"
SERVER = "10.201.0.1"
FIRST, LAST = "10.201.0.10", "10.201.0.50"
# A boot takes 1-4 minutes here, much more when the host is busy (two at once, on 2 cores).
GUEST_TIMEOUT_S = 1200
TEST_TIMEOUT_S = 1500
VMMS = ("isovisor", "qemu")
DHCP_LINE = re.compile(
    r"IP-Config: Got DHCP answer from (\S+), my address is (\d+\.\d+\.\d+\.\d+)"
)


@dataclass
class Boot:
    vmm: str
    ns: NetNs
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    dnsmasq_log: Path
    started: float


@dataclass(frozen=True)
class BootResult:
    vmm: str
    returncode: int
    stdout: str
    stderr: str
    dnsmasq: str
    seconds: float

    def context(self) -> str:
        tail = "\n".join(self.stdout.splitlines()[-20:])
        return (
            f"{self.vmm}: exit {self.returncode} after {self.seconds:.0f} s\n"
            f"--- last guest lines ---\n{tail}\n--- stderr ---\n{self.stderr[-2000:]}\n"
            f"--- dnsmasq ---\n{self.dnsmasq[-2000:]}"
        )


def vmm_argv(vmm: str) -> list[str]:
    if vmm == "isovisor":
        return [
            sys.executable, "-m", "isovisor.cli.main", "run",
            "--kernel", str(TEST_KERNEL), "--net", f"tap={TAP}", "--memory", "256M",
            "--cmdline", CMDLINE, "--serial", "stdio", "--timeout", str(GUEST_TIMEOUT_S),
        ]
    return [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-cpu",
        "host,-arch-capabilities", "-m", "256", "-nodefaults", "-no-user-config",
        "-nographic", "-serial", "stdio", "-no-reboot",
        "-global", "virtio-mmio.force-legacy=false", "-kernel", str(TEST_KERNEL),
        "-append", CMDLINE,
        "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
        "-device", "virtio-net-device,netdev=n0",
    ]


def start_boot(vmm: str, directory: Path) -> Boot:
    ns = NetNs()
    try:
        ns.add_tap(TAP, f"{SERVER}/24")
        log = directory / f"{vmm}.dnsmasq"
        ns.start_dnsmasq(TAP, FIRST, LAST, log)
        out, err = directory / f"{vmm}.out", directory / f"{vmm}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = ns.popen(vmm_argv(vmm), net_only=vmm == "isovisor", cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except BaseException:
        ns.close()
        raise
    return Boot(vmm, ns, proc, out, err, log, time.monotonic())


def finish(boot: Boot) -> BootResult:
    try:
        rc = boot.proc.wait(timeout=GUEST_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        boot.proc.kill()
        rc = boot.proc.wait()
    return BootResult(
        boot.vmm, rc, boot.stdout.read_text(errors="replace"),
        boot.stderr.read_text(errors="replace"),
        boot.dnsmasq_log.read_text(errors="replace"), time.monotonic() - boot.started,
    )


@pytest.fixture(scope="module")
def boots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Boot]]:
    why = kvm_usable()
    if why is not None:
        pytest.skip(f"{NO_KVM_REASON}: {why}")
    if not TEST_KERNEL.is_file():
        pytest.fail(f"the test kernel {TEST_KERNEL} is missing (see guest-kernels/README.md)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run `make setup`")
    directory = tmp_path_factory.mktemp("net-linux")
    started: dict[str, Boot] = {}
    try:
        for vmm in VMMS:
            started[vmm] = start_boot(vmm, directory)
        yield started
    finally:
        for boot in started.values():
            boot.ns.close()  # kills the VMM and dnsmasq (by pid), deletes TAP and namespace
    assert namespaces_left() == []


def check_boot(result: BootResult) -> str:
    """The assertions both VMMs must pass; the leased address."""
    lines = [ln.rstrip("\r") for ln in result.stdout.splitlines()]
    ctx = result.context()
    assert lines and lines[0].startswith("Linux version 6.1."), ctx
    assert any(ln.startswith("virtio_net virtio0") or "eth0" in ln for ln in lines), ctx
    found = [m for m in map(DHCP_LINE.search, lines) if m]
    assert found, ctx
    server, address = found[0].groups()
    assert server == SERVER, ctx
    last_octet = int(address.rsplit(".", 1)[1])
    assert address.startswith("10.201.0.") and 10 <= last_octet <= 50, ctx
    assert f"DHCPACK({TAP}) {address}" in result.dnsmasq, ctx
    dhcp_at = next(i for i, ln in enumerate(lines) if DHCP_LINE.search(ln))
    panic = [i for i, ln in enumerate(lines) if "VFS: Unable to mount root fs" in ln]
    assert panic and panic[-1] > dhcp_at, ctx
    assert result.returncode == 0, ctx  # the guest reset (panic=-1)
    return address


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("vmm", VMMS)
def test_linux_gets_a_dhcp_lease_through_virtio_net(vmm: str, boots: dict[str, Boot]) -> None:
    result = finish(boots[vmm])
    print(f"test kernel DHCP over virtio-net, {vmm}: {result.seconds:.0f} s")
    address = check_boot(result)
    if vmm == "isovisor":
        stop = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        assert stop.startswith("isovisor: guest reset"), result.context()
    print(f"{vmm}: leased {address}")
