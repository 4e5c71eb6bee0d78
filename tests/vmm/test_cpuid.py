"""CPUID policy: per-vCPU topology, hypervisor bit, masks with their dependents."""

from __future__ import annotations

from isovisor.kvm import CpuidEntry, Kvm
from isovisor.vmm.cpu_features import FEATURES, with_dependents
from isovisor.vmm.cpuid import HYPERVISOR_BIT, build_cpuid, visible_bit


def _leaf(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    return next(e for e in entries if e.function == function and e.index == index)


def test_topology_per_vcpu(kvm: Kvm) -> None:
    supported = kvm.supported_cpuid()
    for i in range(4):
        table = build_cpuid(supported, i, 4, set())
        l1 = _leaf(table, 1)
        assert l1.ebx >> 24 == i  # initial APIC id
        assert (l1.ebx >> 16) & 0xFF == 4
        assert l1.ecx & HYPERVISOR_BIT
        if any(e.function == 0xB for e in supported):
            smt, core = _leaf(table, 0xB, 0), _leaf(table, 0xB, 1)
            assert (smt.ebx, smt.edx) == (1, i)
            assert core.ebx == 4 and core.eax == 2 and core.edx == i  # 2 bits of core id
            assert (core.ecx >> 8) & 0xFF == 2  # level type: core


def test_masks_hide_features_and_their_dependents(kvm: Kvm) -> None:
    supported = kvm.supported_cpuid()
    plain = build_cpuid(supported, 0, 1, set())
    masked = build_cpuid(supported, 0, 1, {"xsave", "popcnt"})
    for name in with_dependents({"xsave", "popcnt"}):
        assert not visible_bit(masked, name), name
    assert "avx" in with_dependents({"xsave"})
    # features not asked for keep what the host offers
    for name in FEATURES:
        if name not in with_dependents({"xsave", "popcnt"}):
            assert visible_bit(masked, name) == visible_bit(plain, name), name


def test_the_table_is_accepted_by_kvm(kvm: Kvm) -> None:
    from isovisor.kvm import VcpuFd, VmFd

    vm = VmFd(kvm.create_vm())
    try:
        cpu = VcpuFd(vm.create_vcpu(0), kvm.vcpu_mmap_size)
        cpu.set_cpuid2(build_cpuid(kvm.supported_cpuid(), 0, 2, {"xsave"}))
        cpu.close()
    finally:
        vm.close()
