"""Helpers for tests that run hand-assembled code in a bare VM (no loader, no devices)."""

from __future__ import annotations

from isovisor.kvm import Kvm
from isovisor.kvm import constants as c
from isovisor.vmm import x86_setup
from isovisor.vmm.vm import Vm

CODE_ADDR = 0x10_0000


class Recorder:
    """A bus device that records writes and answers reads with a fixed byte."""

    def __init__(self, answer: int = 0) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.answer = answer

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.answer]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def raw_vm(kvm: Kvm, code: bytes, vcpus: int = 1, all_runnable: bool = True) -> Vm:
    """A VM whose vCPUs all start in 32-bit protected mode at CODE_ADDR running `code`."""
    vm = Vm(kvm, 32 << 20, vcpus)
    x86_setup.write_gdt(vm.mem)
    vm.mem.write_all(CODE_ADDR, code)
    supported = kvm.supported_cpuid()
    for i, fd in enumerate(vm.vcpu_fds):
        fd.set_cpuid2(supported)
        sregs = fd.get_sregs()
        x86_setup.pvh_sregs(sregs)
        fd.set_sregs(sregs)
        fd.set_regs(x86_setup.entry_regs(CODE_ADDR, 0, "pvh"))
        if i == 0 or all_runnable:
            fd.set_mp_state(c.KVM_MP_STATE_RUNNABLE)
    return vm


# mov dx, 0x3f8 ; mov al, 'A' ; out dx, al ; mov al, 'B' ; out dx, al ; jmp $
OUT_AB_THEN_SPIN = bytes.fromhex("66baf803" "b041" "ee" "b042" "ee" "ebfe")
SPIN = bytes.fromhex("ebfe")
