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
