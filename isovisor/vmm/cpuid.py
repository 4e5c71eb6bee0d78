"""The CPUID each vCPU sees, built from what the host's KVM supports.

Per-vCPU topology (APIC id, logical count, leaves 0x1/0x4/0xB/0x1F), the hypervisor bit,
and feature bits masked where this host's KVM cannot run them (detected by
emulator_probe on hosts that need it; never on hardware-virtualization hosts).
"""

from __future__ import annotations

from dataclasses import replace

from isovisor.kvm import CpuidEntry
from isovisor.kvm.structs import KVM_CPUID_FLAG_SIGNIFCANT_INDEX
from isovisor.vmm.cpu_features import FEATURES, with_dependents

HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
HTT_BIT = 1 << 28  # leaf 1 EDX
LEAF7_EDX_HYBRID = 1 << 15


def _bits_for(count: int) -> int:
    """Width of an APIC-id field that holds `count` ids."""
    return max(count - 1, 0).bit_length()


def build_cpuid(
    supported: list[CpuidEntry], vcpu_index: int, vcpu_count: int, masked: set[str]
) -> list[CpuidEntry]:
    """The CPUID table for one vCPU (APIC id = vcpu_index, one core per vCPU, no SMT)."""
    apic_id = vcpu_index
    hidden = with_dependents(masked)
    out: list[CpuidEntry] = []
    for e in supported:
        f, i = e.function, e.index
        if f == 1:
            ebx = (e.ebx & 0x0000_FFFF) | (apic_id << 24) | (min(vcpu_count, 255) << 16)
            ebx = (ebx & ~0xFF00) | (8 << 8)  # CLFLUSH line size: 8 quadwords
            edx = (e.edx | HTT_BIT) if vcpu_count > 1 else (e.edx & ~HTT_BIT)
            e = replace(e, ebx=ebx, ecx=e.ecx | HYPERVISOR_BIT, edx=edx)
        elif f == 4:
            # EAX[31:26]: cores per package - 1; EAX[25:14]: logical CPUs sharing this cache
            # - 1 (a private cache per core here, the package-wide L3 shared by all).
            level = (e.eax >> 5) & 0x7
            sharing = (vcpu_count - 1) if level >= 3 else 0
            eax = (e.eax & 0x3FFF) | ((vcpu_count - 1) << 26) | (sharing << 14)
            e = replace(e, eax=eax if e.eax & 0x1F else e.eax)
        elif f in (0xB, 0x1F):
            if i == 0:
                out.extend(_extended_topology(f, apic_id, vcpu_count))
            continue  # KVM reports subleaf 0 only; we emit every level ourselves
        elif f == 6:
            e = replace(e, eax=e.eax & ~(1 << 4))  # no HWP: the guest cannot drive host P-states
        elif f == 0x8000_0001 and vcpu_count == 1:
            e = replace(e, ecx=e.ecx & ~(1 << 1))  # CmpLegacy only with more than one core
        for name in hidden:
            bit = FEATURES[name]
            if (bit.leaf, bit.subleaf) == (f, i if bit.leaf in (7, 0xD) else 0):
                reg = getattr(e, bit.register) & ~(1 << bit.bit)
                e = replace(e, **{bit.register: reg})
        if f == 0xD and i in (0, 1) and "xsave" in hidden:
            e = replace(e, eax=0, ebx=0, ecx=0, edx=0)
        out.append(e)
    return out


def _extended_topology(leaf: int, apic_id: int, vcpu_count: int) -> list[CpuidEntry]:
    """Leaf 0xB/0x1F: SMT level (one thread per core), core level, then the end marker."""
    flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    core_bits = _bits_for(vcpu_count)
    return [
        CpuidEntry(leaf, 0, flags, eax=0, ebx=1, ecx=(1 << 8) | 0, edx=apic_id),
        CpuidEntry(leaf, 1, flags, eax=core_bits, ebx=vcpu_count, ecx=(2 << 8) | 1, edx=apic_id),
        CpuidEntry(leaf, 2, flags, eax=0, ebx=0, ecx=2, edx=apic_id),
    ]


def visible_bit(entries: list[CpuidEntry], name: str) -> bool:
    """Is feature `name` set in this CPUID table? (used by tests and diagnostics)"""
    bit = FEATURES[name]
    for e in entries:
        if e.function == bit.leaf and (e.index == bit.subleaf or bit.leaf not in (7, 0xD)):
            return bool(getattr(e, bit.register) >> bit.bit & 1)
    return False
