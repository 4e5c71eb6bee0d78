"""Machine wiring: devices on the bus, boot registers, MSRs, APs waiting for SIPI."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.kvm import Kvm
from isovisor.kvm import constants as c
from isovisor.memory.layout import PVH_START_INFO_ADDR
from isovisor.vmm.boot.errors import BootError
from isovisor.vmm.builder import Machine, SerialSpec, VmSpec
from isovisor.vmm.msrs import MSR_MTRR_DEF_TYPE, MTRR_ENABLE, MTRR_TYPE_WRBACK
from isovisor.vmm.vm import VmError


def test_machine_is_wired_for_pvh(kvm: Kvm, built_guests: dict[str, Path]) -> None:
    spec = VmSpec(kernel=built_guests["hello"], memory=32 << 20, vcpus=2,
                  serial=SerialSpec(target="none"))
    m = Machine(spec, kvm)
    try:
        names = {r.name for r in m.vm.pio.ranges()}
        assert {"com1", "i8042-data", "i8042-command", "cmos-rtc"} <= names
        bsp, ap = m.vm.vcpu_fds
        regs = bsp.get_regs()
        assert m.boot.protocol == "pvh"
        assert regs.rip == m.boot.entry and regs.rbx == PVH_START_INFO_ADDR
        sregs = bsp.get_sregs()
        assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31)  # protected mode, paging off
        assert sregs.cs.db == 1 and sregs.cs.base == 0
        assert bsp.get_mp_state() == c.KVM_MP_STATE_RUNNABLE
        assert ap.get_mp_state() == c.KVM_MP_STATE_UNINITIALIZED  # waits for INIT/SIPI
        msrs = bsp.get_msrs([MSR_MTRR_DEF_TYPE])
        assert msrs[MSR_MTRR_DEF_TYPE] == MTRR_ENABLE | MTRR_TYPE_WRBACK
    finally:
        m.close()


def test_machine_refuses_bad_inputs_cleanly(kvm: Kvm, tmp_path: Path) -> None:
    with pytest.raises(VmError, match="does not exist"):
        Machine(VmSpec(kernel=tmp_path / "missing"), kvm)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)
    with pytest.raises(BootError):
        Machine(VmSpec(kernel=junk, memory=32 << 20, serial=SerialSpec(target="none")), kvm)
    with pytest.raises(VmError, match="--vcpus"):
        Machine(VmSpec(kernel=junk, vcpus=100000, serial=SerialSpec(target="none")), kvm)


def test_linux_boot_gets_the_acpi_rsdp_and_long_mode(kvm: Kvm) -> None:
    from isovisor.memory.layout import BOOT_PARAMS_ADDR
    from tests.conftest import TEST_KERNEL

    if not TEST_KERNEL.exists():
        pytest.fail(f"{TEST_KERNEL} is missing (../shared/guest-kernels)")
    spec = VmSpec(kernel=TEST_KERNEL, memory=256 << 20, protocol="linux",
                  serial=SerialSpec(target="none"))
    m = Machine(spec, kvm)
    try:
        assert m.boot.protocol == "linux64"
        assert m.vm.mem.read_u64(BOOT_PARAMS_ADDR + 0x70) == m.rsdp  # acpi_rsdp_addr
        assert m.vm.mem.read_exact(m.rsdp, 8) == b"RSD PTR "
        bsp = m.vm.vcpu_fds[0]
        sregs = bsp.get_sregs()
        assert sregs.efer & (1 << 10) and sregs.cs.l == 1  # long mode, 64-bit CS
        assert sregs.cs.selector == 0x10 and sregs.ds.selector == 0x18  # __BOOT_CS/DS
        assert bsp.get_regs().rsi == BOOT_PARAMS_ADDR
    finally:
        m.close()


def test_virtio_devices_get_slots_and_acpi_entries(
    kvm: Kvm, built_guests: dict[str, Path]
) -> None:
    spec = VmSpec(kernel=built_guests["hello"], memory=32 << 20, rng=True,
                  serial=SerialSpec(target="none"))
    m = Machine(spec, kvm)
    try:
        r = m.vm.mmio.find(0xD000_0000)
        assert r is not None and r.length == 0x1000
        assert m.vm.mmio.read(0xD000_0000, 4) == b"virt"  # virtio-mmio MagicValue
        assert int.from_bytes(m.vm.mmio.read(0xD000_0008, 4), "little") == 4  # entropy device
        acpi = m.vm.mem.read_exact(0xE0000, 0x2000)
        assert b"LNRO0005" in acpi
    finally:
        m.close()
