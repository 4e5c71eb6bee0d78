"""Initial x86 CPU state for each boot protocol: GDT, identity page tables, registers.

PVH (Xen docs/misc/pvh.pandoc): 32-bit protected mode, paging off, flat 32-bit CS and
DS/ES/SS, a 32-bit TSS in TR, EFLAGS with IF, TF and VM clear, EBX = hvm_start_info.
Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"):
long mode with an identity map covering the kernel, boot_params and command line; CS =
__BOOT_CS (0x10) and DS/ES/SS = __BOOT_DS (0x18) flat; RSI = boot_params.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from isovisor.kvm import structs as abi
from isovisor.memory import GuestMemory
from isovisor.memory.layout import (
    BOOT_GDT_ADDR,
    BOOT_IDT_ADDR,
    PDE_ADDR,
    PDPTE_ADDR,
    PML4_ADDR,
)

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1

SEL_CODE32 = 0x08
SEL_CODE64 = 0x10  # __BOOT_CS
SEL_DATA = 0x18  # __BOOT_DS
SEL_TSS = 0x20


@dataclass(frozen=True)
class Descriptor:
    """A GDT entry in the form KVM's kvm_segment wants it, plus its packed bytes."""

    base: int
    limit: int
    type: int
    s: int
    dpl: int
    present: int
    avl: int
    l: int  # noqa: E741 - the architectural name
    db: int
    g: int

    def pack(self) -> int:
        lim = self.limit
        access = self.type | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = self.avl | (self.l << 1) | (self.db << 2) | (self.g << 3)
        return (
            (lim & 0xFFFF)
            | ((self.base & 0xFFFFFF) << 16)
            | (access << 40)
            | (((lim >> 16) & 0xF) << 48)
            | (flags << 52)
            | (((self.base >> 24) & 0xFF) << 56)
        )

    def segment(self, selector: int) -> abi.kvm_segment:
        seg = abi.kvm_segment()
        seg.base = self.base
        seg.limit = (self.limit << 12) | 0xFFF if self.g else self.limit
        seg.selector = selector
        seg.type, seg.present, seg.dpl, seg.db = self.type, self.present, self.dpl, self.db
        seg.s, seg.l, seg.g, seg.avl = self.s, self.l, self.g, self.avl
        return seg


CODE32 = Descriptor(0, 0xFFFFF, 0xB, 1, 0, 1, 0, 0, 1, 1)  # execute/read, accessed
CODE64 = Descriptor(0, 0xFFFFF, 0xB, 1, 0, 1, 0, 1, 0, 1)
DATA = Descriptor(0, 0xFFFFF, 0x3, 1, 0, 1, 0, 0, 1, 1)  # read/write, accessed
TSS32 = Descriptor(0, 0x67, 0xB, 0, 0, 1, 0, 0, 0, 0)  # busy 32-bit TSS

GDT = [None, CODE32, CODE64, DATA, TSS32]


def write_gdt(mem: GuestMemory) -> None:
    table = b"".join(struct.pack("<Q", d.pack() if d else 0) for d in GDT)
    mem.write_all(BOOT_GDT_ADDR, table)
    mem.write_u64(BOOT_IDT_ADDR, 0)


def write_identity_page_tables(mem: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages (PML4 -> PDPT -> 4 PDs)."""
    present_rw = 0x3
    mem.write_u64(PML4_ADDR, PDPTE_ADDR | present_rw)
    for i in range(4):
        pd = PDE_ADDR + i * 0x1000
        mem.write_u64(PDPTE_ADDR + i * 8, pd | present_rw)
        entries = b"".join(
            struct.pack("<Q", ((i << 30) + (j << 21)) | present_rw | 0x80) for j in range(512)
        )
        mem.write_all(pd, entries)


def _base_sregs(sregs: abi.kvm_sregs, code: Descriptor, code_sel: int) -> None:
    sregs.cs = code.segment(code_sel)
    data = DATA.segment(SEL_DATA)
    sregs.ds = data
    sregs.es = data
    sregs.fs = data
    sregs.gs = data
    sregs.ss = data
    sregs.tr = TSS32.segment(SEL_TSS)
    sregs.gdt.base = BOOT_GDT_ADDR
    sregs.gdt.limit = len(GDT) * 8 - 1
    sregs.idt.base = BOOT_IDT_ADDR
    sregs.idt.limit = 0


def pvh_sregs(sregs: abi.kvm_sregs) -> None:
    _base_sregs(sregs, CODE32, SEL_CODE32)
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0


def long_mode_sregs(sregs: abi.kvm_sregs) -> None:
    _base_sregs(sregs, CODE64, SEL_CODE64)
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = X86_CR4_PAE
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
    sregs.efer = EFER_LME | EFER_LMA


def entry_regs(entry: int, boot_struct: int, protocol: str) -> abi.kvm_regs:
    regs = abi.kvm_regs()
    regs.rip = entry
    regs.rflags = RFLAGS_RESERVED
    if protocol == "pvh":
        regs.rbx = boot_struct
    else:
        regs.rsi = boot_struct
    return regs
