"""assists: int3 and fwait done by the VMM when KVM's emulator cannot (PVM hosts)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from isovisor.kvm import Kvm, VcpuFd, VmFd
from isovisor.kvm.constants import ExitReason
from isovisor.memory import GuestMemory, layout
from isovisor.vmm import x86_setup
from isovisor.vmm.assists import ASSISTS, FSW_ES, try_assist

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(
        not os.path.exists("/dev/kvm"),
        reason="/dev/kvm IS MISSING: the assists need KVM; these tests did not run",
    ),
]

IDT_ADDR = 0x3000
BP_HANDLER = 0x10_1800  # out 0x81, al; iretq
STACK_TOP = 0x30_0000
PAGE_END = 0x10_1000
OUT_81_IRETQ = bytes.fromhex("e68148cf")
HLT = 0xF4
MAX_EXITS = 8  # every guest below ends in hlt within a few exits


@dataclass
class Guest:
    vcpu: VcpuFd
    mem: GuestMemory

    def run(self) -> int:
        self.vcpu.run_once()
        return int(self.vcpu.kvm_run.exit_reason)

    def port(self) -> int:
        return int(self.vcpu.kvm_run.exit.io.port)


MakeGuest = Callable[..., Guest]  # (code, at, *, cr4=0) -> a vCPU about to run `code`


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    k = Kvm()
    yield k
    k.close()


@pytest.fixture
def make_guest(kvm: Kvm) -> Iterator[MakeGuest]:
    owned: list[tuple[VcpuFd, VmFd, GuestMemory]] = []

    def make(code: bytes, at: int, *, cr4: int = 0) -> Guest:
        vm = VmFd(kvm.create_vm())
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        mem = GuestMemory(16 * layout.MiB)
        mem.register(vm)
        x86_setup.write_gdt(mem)
        x86_setup.write_identity_page_tables(mem)
        mem.fill(0x10_0000, 0x2000, HLT)
        mem.write_all(BP_HANDLER, OUT_81_IRETQ)
        gate = struct.pack("<HHBBHII", BP_HANDLER & 0xFFFF, x86_setup.SEL_CODE64, 0, 0x8E,
                           BP_HANDLER >> 16, 0, 0)
        mem.write_all(IDT_ADDR + 3 * 16, gate)
        mem.write_all(at, code)
        vcpu = VcpuFd(vm.create_vcpu(0), kvm.vcpu_mmap_size)
        owned.append((vcpu, vm, mem))
        vcpu.set_cpuid2(kvm.supported_cpuid())
        sregs = vcpu.get_sregs()
        x86_setup.long_mode_sregs(sregs)
        sregs.idt.base, sregs.idt.limit = IDT_ADDR, 16 * 16 - 1
        sregs.cr4 |= cr4
        vcpu.set_sregs(sregs)
        regs = x86_setup.entry_regs(at, 0, "linux")
        regs.rsp, regs.rsi, regs.rax = STACK_TOP, 0x20_0000, 1
        vcpu.set_regs(regs)
        return Guest(vcpu, mem)

    yield make
    for vcpu, vm, mem in owned:
        vcpu.close()
        vm.close()
        mem.close()


def _ports_with_assists(g: Guest, enabled: frozenset[str]) -> tuple[list[int], list[str], int]:
    """Run to hlt; the OUT ports seen, the assists applied, and #BP's saved RIP."""
    ports: list[int] = []
    applied: list[str] = []
    saved_rip = -1
    for _ in range(MAX_EXITS):
        reason = g.run()
        if reason == ExitReason.IO:
            ports.append(g.port())
            if g.port() == 0x81:
                saved_rip = g.mem.read_u64(g.vcpu.get_regs().rsp)  # iretq frame: RIP first
        elif reason == ExitReason.INTERNAL_ERROR:
            name = try_assist(g.vcpu, g.mem, enabled)
            assert name is not None, "an emulation failure the assists did not handle"
            applied.append(name)
        else:
            assert reason == ExitReason.HLT
            break
    return ports, applied, saved_rip


def test_int3_injects_bp_with_rip_after_int3(make_guest: MakeGuest) -> None:
    code_at = 0x10_0000
    g = make_guest(bytes([0xCC, 0xE6, 0x82, HLT]), code_at)
    ports, applied, saved_rip = _ports_with_assists(g, ASSISTS)
    assert ports == [0x81, 0x82]
    assert saved_rip == code_at + 1
    assert applied in ([], ["int3"])  # none needed on hardware-virtualization hosts


def test_int3_from_memory_across_page_boundary(make_guest: MakeGuest) -> None:
    # int3 is the last byte of a page; force the translate-and-read path.
    code_at = PAGE_END - 1
    g = make_guest(bytes([0xCC, 0xE6, 0x82, HLT]), code_at)
    if g.run() != ExitReason.INTERNAL_ERROR:
        pytest.skip("this host's KVM runs int3 in ring 0 itself")
    g.vcpu.kvm_run.exit.emulation_failure.flags = 0  # as if KVM gave no instruction bytes
    assert try_assist(g.vcpu, g.mem, ASSISTS) == "int3"
    assert g.run() == ExitReason.IO and g.port() == 0x81
    assert g.mem.read_u64(g.vcpu.get_regs().rsp) == PAGE_END
    assert g.run() == ExitReason.IO and g.port() == 0x82


def test_fwait_skipped(make_guest: MakeGuest) -> None:
    g = make_guest(bytes([0x9B, 0xE6, 0x82, HLT]), 0x10_0000)
    ports, applied, _ = _ports_with_assists(g, ASSISTS)
    assert ports == [0x82]
    assert applied in ([], ["fwait"])


def test_fwait_with_pending_x87_exception_not_skipped(make_guest: MakeGuest) -> None:
    g = make_guest(bytes([0x9B, 0xE6, 0x82, HLT]), 0x10_0000)
    fpu = g.vcpu.get_fpu()
    fpu.fsw |= FSW_ES
    g.vcpu.set_fpu(fpu)
    if g.run() != ExitReason.INTERNAL_ERROR:
        pytest.skip("this host's KVM runs fwait in ring 0 itself")
    rip = g.vcpu.get_regs().rip
    assert try_assist(g.vcpu, g.mem, ASSISTS) is None
    assert g.vcpu.get_regs().rip == rip


def test_disabled_assist_not_applied(make_guest: MakeGuest) -> None:
    g = make_guest(bytes([0xCC, HLT]), 0x10_0000)
    if g.run() != ExitReason.INTERNAL_ERROR:
        pytest.skip("this host's KVM runs int3 in ring 0 itself")
    assert try_assist(g.vcpu, g.mem, frozenset({"fwait"})) is None
    assert try_assist(g.vcpu, g.mem, frozenset()) is None
    assert g.vcpu.get_regs().rip == 0x10_0000
    assert not g.vcpu.get_vcpu_events().exception.injected


def test_unrecognised_instruction_not_assisted(make_guest: MakeGuest) -> None:
    osxsave_osfxsr = (1 << 18) | (1 << 9)
    g = make_guest(bytes.fromhex("0fae26") + bytes([HLT]), 0x10_0000,
                   cr4=osxsave_osfxsr)  # xsave [rsi]
    if g.run() != ExitReason.INTERNAL_ERROR:
        pytest.skip("this host's KVM runs xsave in ring 0 itself")
    assert try_assist(g.vcpu, g.mem, ASSISTS) is None
    assert g.vcpu.get_regs().rip == 0x10_0000


def test_not_an_emulation_failure(make_guest: MakeGuest) -> None:
    g = make_guest(bytes([0xE6, 0x82, HLT]), 0x10_0000)
    assert g.run() == ExitReason.IO
    assert try_assist(g.vcpu, g.mem, ASSISTS) is None
