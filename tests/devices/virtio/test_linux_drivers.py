"""Acceptance: Linux's own virtio-blk and virtio-net drivers (the test kernel,
guest-kernels/vmlinux-virtio-6.1) against our devices, and against QEMU microvm's: one boot
per VMM finds both devices through the ACPI tables, gets a DHCP lease through virtio-net
from a dnsmasq on the other end of a TAP, then mounts a 16 MiB ext4 image as root=/dev/vda
read-write from virtio-blk and starts init ("Run /sbin/init"). There is no init, so it
panics and, with panic=-1, resets: both VMMs exit 0. The mount really was read-write
through the device: the image's superblock on the host records it. (One boot for both
devices: a boot costs minutes of interpreted kernel code on this host.)

Each VMM gets a network namespace of its own. isovisor's guest sits on a tenant network
as the daemon builds them (isovisor.host.network: a namespace of the network's own with a
bridge, the NIC's TAP behind its anti-spoofing rules, a dnsmasq that knows the NIC's fixed
MAC and IP), with a second tenant's network and dnsmasq alive beside it, the same CIDR,
and that dnsmasq told about the very same MAC (with another address): the lease must be
the NIC's assigned address from its own network's server, and the other server must
never hear the guest. isovisor
runs as `isovisor run` does by default, in its jailed worker, attaching the TAP with
`--net tap=...,netns=...` as the daemon does (nsenter switches only the network namespace:
the jail needs the host's /sys). QEMU's guest keeps the plain set-up it always had: a TAP
addressed 10.201.0.1/24 and a DHCP-only dnsmasq bound to it. isovisor opens the disk
image on the host side and hands the jailed worker its fd. Kernel-mode code is interpreted
on this host (minutes per boot), so both boots start together, as two processes, when the
module's first test asks for them.
"""

from __future__ import annotations

import ipaddress
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

from isovisor.host.network.addressing import NetworkPlan, NicPlan
from isovisor.host.network.dhcp import LOG_FILE
from isovisor.host.network.plumbing import NetworkPlumbing
from tests.conftest import NO_KVM_REASON, REPO, TEST_KERNEL, TEST_KERNEL_CMDLINE, kvm_usable
from tests.devices.virtio.netns import NetNs, namespaces_left

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]

CMDLINE = TEST_KERNEL_CMDLINE  # guest-kernels/README.md
TAP = "isvtap0"
SERVER = "10.201.0.1"
FIRST, LAST = "10.201.0.10", "10.201.0.50"
# A boot takes 1-4 minutes here, much more when the host is busy (two at once, on 2 cores).
GUEST_TIMEOUT_S = 1200
TEST_TIMEOUT_S = 1500
VMMS = ("isovisor", "qemu")
# isovisor's guest: tenant A's network and NIC; tenant B's network beside it, whose dnsmasq
# also has an entry for A's NIC's MAC (so it would answer, were it ever reached).
NET_A = NetworkPlan("0000aa01", ipaddress.IPv4Network("10.201.0.0/24"))
NET_B = NetworkPlan("0000bb01", ipaddress.IPv4Network("10.201.0.0/24"))  # the same range
NIC_A = NicPlan("0000aa02", NET_A, "02:00:0a:c9:00:07", ipaddress.IPv4Address("10.201.0.7"))
DECOY_B = NicPlan("0000bb02", NET_B, NIC_A.mac, ipaddress.IPv4Address("10.201.0.9"))
DHCP_LINE = re.compile(
    r"IP-Config: Got DHCP answer from (\S+), my address is (\d+\.\d+\.\d+\.\d+)"
)
IMAGE_BYTES = 16 << 20
# In boot order: the disk found through ACPI, the lease (ip=dhcp runs before the root
# mount), the ext4 root mounted read-write, init started.
DISK_FOUND = re.compile(r"virtio_blk virtio\d+: \[vda\] 32768 512-byte logical blocks")
MOUNTED = "EXT4-fs (vda): mounted filesystem"
INIT = "Run /sbin/init"


@dataclass
class Boot:
    vmm: str
    ns: NetNs
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    dnsmasq_log: Path
    started: float
    image: Path
    other_dnsmasq_log: Path | None = None  # tenant B's server (isovisor only)


@dataclass(frozen=True)
class BootResult:
    vmm: str
    returncode: int
    stdout: str
    stderr: str
    dnsmasq: str
    seconds: float
    image: Path
    other_dnsmasq: str = ""

    def context(self) -> str:
        tail = "\n".join(self.stdout.splitlines()[-20:])
        return (
            f"{self.vmm}: exit {self.returncode} after {self.seconds:.0f} s\n"
            f"--- last guest lines ---\n{tail}\n--- stderr ---\n{self.stderr[-2000:]}\n"
            f"--- dnsmasq ---\n{self.dnsmasq[-2000:]}"
        )


def make_ext4(path: Path) -> Path:
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    if not os.access(mkfs, os.X_OK):
        pytest.fail("mkfs.ext4 is missing: install e2fsprogs (`make setup` does)")
    with path.open("wb") as f:
        f.truncate(IMAGE_BYTES)
    subprocess.run([mkfs, "-q", "-F", str(path)], check=True, timeout=60)
    return path


def mount_count(image: Path) -> int | None:
    """The ext4 superblock's mount count (a read-write mount increments it on disk)."""
    dumpe2fs = shutil.which("dumpe2fs") or "/sbin/dumpe2fs"
    out = subprocess.run([dumpe2fs, "-h", str(image)], capture_output=True, text=True,
                         timeout=60).stdout
    for line in out.splitlines():
        if line.startswith("Mount count:"):
            return int(line.split(":")[1])
    return None


def vmm_argv(vmm: str, image: Path, netns: str = "") -> list[str]:
    if vmm == "isovisor":
        return [
            sys.executable, "-m", "isovisor.cli.main", "run",
            "--kernel", str(TEST_KERNEL), "--memory", "256M", "--disk", str(image),
            "--net", f"tap={NIC_A.tap},mac={NIC_A.mac},netns={netns}",
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
        "-device", "virtio-blk-device,drive=d0",
        "-drive", f"id=d0,file={image},format=raw,if=none",
    ]


def start_boot(vmm: str, directory: Path) -> Boot:
    image = make_ext4(directory / f"{vmm}.img")
    ns = NetNs()
    other = None
    tap_netns = ns.name
    try:
        if vmm == "isovisor":
            plumbing = NetworkPlumbing(ns.name, directory / "net")
            plumbing.ensure_network(NET_A, [NIC_A])
            plumbing.ensure_network(NET_B, [DECOY_B])
            plumbing.ensure_nic(NIC_A)
            plumbing.ensure_nic(DECOY_B)  # B's own segment has a NIC (a TAP) too
            log = directory / "net" / NET_A.id / LOG_FILE
            other = directory / "net" / NET_B.id / LOG_FILE
            tap_netns = plumbing.netns(NET_A)  # the TAP is in its network's namespace
        else:
            ns.add_tap(TAP, f"{SERVER}/24")
            log = directory / f"{vmm}.dnsmasq"
            ns.start_dnsmasq(TAP, FIRST, LAST, log)
        out, err = directory / f"{vmm}.out", directory / f"{vmm}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = ns.popen(vmm_argv(vmm, image, tap_netns), net_only=vmm == "isovisor", cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except BaseException:
        ns.close()
        raise
    return Boot(vmm, ns, proc, out, err, log, time.monotonic(), image, other)


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
        boot.image,
        boot.other_dnsmasq_log.read_text(errors="replace") if boot.other_dnsmasq_log else "",
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
    directory = tmp_path_factory.mktemp("linux-drivers")
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
    if result.vmm == "isovisor":
        # its own tenant network's server, the NIC's fixed address, never tenant B's
        assert server == str(NET_A.gateway) and address == str(NIC_A.ip), ctx
        assert f"DHCPACK({NET_A.bridge}) {address} {NIC_A.mac}" in result.dnsmasq, ctx
        assert "DHCP, static leases only on 10.201.0.0" in result.other_dnsmasq, ctx
        assert NIC_A.mac not in result.other_dnsmasq, result.other_dnsmasq
        assert "DHCPDISCOVER" not in result.other_dnsmasq, result.other_dnsmasq
    else:
        assert server == SERVER, ctx
        last_octet = int(address.rsplit(".", 1)[1])
        assert address.startswith("10.201.0.") and 10 <= last_octet <= 50, ctx
        assert f"DHCPACK({TAP}) {address}" in result.dnsmasq, ctx
    # virtio-blk: the disk found, the lease, ext4 root mounted read-write, init started
    disk_at = [i for i, ln in enumerate(lines) if DISK_FOUND.search(ln)]
    dhcp_at = [i for i, ln in enumerate(lines) if DHCP_LINE.search(ln)]
    mounted_at = [i for i, ln in enumerate(lines) if MOUNTED in ln]
    init_at = [i for i, ln in enumerate(lines) if INIT in ln]
    assert disk_at and mounted_at and init_at, ctx
    assert disk_at[0] < dhcp_at[0] < mounted_at[0] < init_at[0], ctx
    assert not any("I/O error" in ln or "EXT4-fs error" in ln for ln in lines), ctx
    assert result.returncode == 0, ctx  # the guest reset (panic=-1)
    assert mount_count(result.image) == 1, ctx  # mkfs leaves 0; the rw mount wrote 1
    return address


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("vmm", VMMS)
def test_linux_mounts_ext4_root_and_gets_a_dhcp_lease(vmm: str,
                                                      boots: dict[str, Boot]) -> None:
    result = finish(boots[vmm])
    print(f"test kernel with virtio-blk root and virtio-net DHCP, {vmm}: "
          f"{result.seconds:.0f} s")
    address = check_boot(result)
    if vmm == "isovisor":
        stop = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        assert stop.startswith("isovisor: guest reset"), result.context()
        assert "security event" not in result.stderr, result.context()
    print(f"{vmm}: leased {address}")
