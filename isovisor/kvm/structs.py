"""ctypes mirrors of the KVM ABI structures (linux/kvm.h, asm/kvm.h, x86_64).

Sizes are asserted at import so a layout slip fails loudly rather than corrupting an ioctl.
"""

from __future__ import annotations

import ctypes

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32
s64 = ctypes.c_int64


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs_header(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list_header(ctypes.Structure):
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2_header(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", s64),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", u32),
        ("reserved", u32 * 9),
    ]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class _ev_exception(ctypes.Structure):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class _ev_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _ev_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _ev_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _ev_exception),
        ("interrupt", _ev_interrupt),
        ("nmi", _ev_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _ev_smi),
        ("triple_fault_pending", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


# --- struct kvm_run and its exit unions -------------------------------------------------


class _exit_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _exit_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _exit_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _exit_io(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class _exit_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _exit_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_emulation_failure(ctypes.Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class _exit_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_union(ctypes.Union):
    _fields_ = [
        ("hw", _exit_hw),
        ("fail_entry", _exit_fail_entry),
        ("ex", _exit_ex),
        ("io", _exit_io),
        ("mmio", _exit_mmio),
        ("internal", _exit_internal),
        ("emulation_failure", _exit_emulation_failure),
        ("system_event", _exit_system_event),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", _exit_union),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
    ]


_EXPECTED_SIZES: dict[type[ctypes.Structure], int] = {
    kvm_userspace_memory_region: 32,
    kvm_regs: 144,
    kvm_segment: 24,
    kvm_dtable: 16,
    kvm_sregs: 312,
    kvm_fpu: 416,
    kvm_msr_entry: 16,
    kvm_cpuid_entry2: 40,
    kvm_lapic_state: 1024,
    kvm_irqchip: 520,
    kvm_pit_config: 64,
    kvm_pit_state2: 112,
    kvm_irq_level: 8,
    kvm_irqfd: 32,
    kvm_ioeventfd: 64,
    kvm_enable_cap: 104,
    kvm_vcpu_events: 64,
    kvm_translation: 24,
}

for _cls, _size in _EXPECTED_SIZES.items():
    if ctypes.sizeof(_cls) != _size:  # pragma: no cover - a layout bug, not a runtime state
        raise ImportError(f"{_cls.__name__} is {ctypes.sizeof(_cls)} bytes, ABI says {_size}")
if kvm_run.exit.offset != 32:  # pragma: no cover
    raise ImportError("kvm_run exit union must start at offset 32")
