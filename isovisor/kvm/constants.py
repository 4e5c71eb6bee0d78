"""KVM ioctl request numbers, capability numbers, exit reasons (linux/kvm.h, x86_64)."""

from __future__ import annotations

import ctypes
import enum

from isovisor.kvm import structs as s

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


_sz = ctypes.sizeof

# system ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, _sz(s.kvm_msr_list_header))
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _sz(s.kvm_cpuid2_header))
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, _sz(s.kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, _sz(s.kvm_irq_level))
KVM_GET_IRQCHIP = _iowr(0x62, _sz(s.kvm_irqchip))
KVM_SET_IRQCHIP = _ior(0x63, _sz(s.kvm_irqchip))
KVM_IRQFD = _iow(0x76, _sz(s.kvm_irqfd))
KVM_CREATE_PIT2 = _iow(0x77, _sz(s.kvm_pit_config))
KVM_IOEVENTFD = _iow(0x79, _sz(s.kvm_ioeventfd))
KVM_GET_PIT2 = _ior(0x9F, _sz(s.kvm_pit_state2))
KVM_SET_PIT2 = _iow(0xA0, _sz(s.kvm_pit_state2))
KVM_ENABLE_CAP = _iow(0xA3, _sz(s.kvm_enable_cap))
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, _sz(s.kvm_regs))
KVM_SET_REGS = _iow(0x82, _sz(s.kvm_regs))
KVM_GET_SREGS = _ior(0x83, _sz(s.kvm_sregs))
KVM_SET_SREGS = _iow(0x84, _sz(s.kvm_sregs))
KVM_TRANSLATE = _iowr(0x85, _sz(s.kvm_translation))
KVM_GET_MSRS = _iowr(0x88, _sz(s.kvm_msrs_header))
KVM_SET_MSRS = _iow(0x89, _sz(s.kvm_msrs_header))
KVM_GET_FPU = _ior(0x8C, _sz(s.kvm_fpu))
KVM_SET_FPU = _iow(0x8D, _sz(s.kvm_fpu))
KVM_GET_LAPIC = _ior(0x8E, _sz(s.kvm_lapic_state))
KVM_SET_LAPIC = _iow(0x8F, _sz(s.kvm_lapic_state))
KVM_SET_CPUID2 = _iow(0x90, _sz(s.kvm_cpuid2_header))
KVM_GET_CPUID2 = _iowr(0x91, _sz(s.kvm_cpuid2_header))
KVM_GET_MP_STATE = _ior(0x98, _sz(s.kvm_mp_state))
KVM_SET_MP_STATE = _iow(0x99, _sz(s.kvm_mp_state))
KVM_GET_VCPU_EVENTS = _ior(0x9F, _sz(s.kvm_vcpu_events))
KVM_SET_VCPU_EVENTS = _iow(0xA0, _sz(s.kvm_vcpu_events))

IOCTL_NAMES: dict[int, str] = {
    value: name for name, value in dict(globals()).items()
    if name.startswith("KVM_") and isinstance(value, int) and value > 0xFF
}
IOCTL_NAMES[KVM_GET_API_VERSION] = "KVM_GET_API_VERSION"
IOCTL_NAMES[KVM_CREATE_VM] = "KVM_CREATE_VM"

KVM_API_VERSION = 12

# flags
KVM_MEM_READONLY = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_PIT_SPEAKER_DUMMY = 1
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1


class Cap(enum.IntEnum):
    """Capabilities isovisor probes (KVM_CHECK_EXTENSION)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    IRQ_ROUTING = 25
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    MAX_VCPUS = 66
    READONLY_MEM = 81
    IMMEDIATE_EXIT = 136
    EXIT_ON_EMULATION_FAILURE = 204
    SYSTEM_EVENT_DATA = 215
    X86_TRIPLE_FAULT_EVENT = 218


# capabilities without which the VMM cannot run at all
REQUIRED_CAPS = (
    Cap.IRQCHIP,
    Cap.USER_MEMORY,
    Cap.SET_TSS_ADDR,
    Cap.EXT_CPUID,
    Cap.PIT2,
    Cap.IRQFD,
    Cap.IOEVENTFD,
    Cap.VCPU_EVENTS,
    Cap.IMMEDIATE_EXIT,
    Cap.MP_STATE,
)


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    X86_BUS_LOCK = 33
    NOTIFY = 37
    MEMORY_FAULT = 39


class InternalSuberror(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class SystemEvent(enum.IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6
