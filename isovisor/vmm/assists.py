"""VMM-side assists for the few instructions KVM's emulator cannot execute but the VMM can.

PVM hosts only (emulator_probe.EmulatorProbe.needs_assists says which): on
KVM_EXIT_INTERNAL_ERROR / EMULATION, and only when the faulting instruction is exactly one of

  * int3  (0xCC): RIP += 1, then inject #BP (vector 3, no error code), so the guest's #BP
    handler runs with the return RIP after the int3, as on hardware (SDM Vol. 2A, INT3);
  * fwait (0x9B): RIP += 1 when it would not fault: no pending unmasked x87 exception
    (FSW.ES clear) and not (CR0.TS and CR0.MP) (SDM Vol. 2B, WAIT/FWAIT).

Anything else, including a prefixed form, is left alone: the caller stops the VM as before.
The instruction bytes come from the exit (KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
or, without them, from guest memory through KVM_TRANSLATE, read only via GuestMemory.
"""

from __future__ import annotations

from isovisor.kvm import KvmError, VcpuFd
from isovisor.kvm import structs as s
from isovisor.kvm.constants import (
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    ExitReason,
    InternalSuberror,
)
from isovisor.memory import GuestMemory
from isovisor.memory.errors import GuestMemoryError
from isovisor.memory.layout import PAGE_SIZE

ASSIST_INT3 = "int3"
ASSIST_FWAIT = "fwait"
ASSISTS: frozenset[str] = frozenset({ASSIST_INT3, ASSIST_FWAIT})

OPCODE_INT3 = 0xCC
OPCODE_FWAIT = 0x9B
MAX_INSN_LEN = 15  # the architectural limit on an x86 instruction's length
VECTOR_BP = 3  # #BP: a trap, no error code; the saved RIP is the next instruction
FSW_ES = 1 << 7  # x87 status word: error summary (an unmasked exception is pending)
CR0_MP = 1 << 1
CR0_TS = 1 << 3
EFER_LMA = 1 << 10
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
_U16 = (1 << 16) - 1


def _ip_mask(sregs: s.kvm_sregs) -> int:
    """Width of RIP arithmetic: 64-bit code, else the CS default operand size."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return _U64
    return _U32 if sregs.cs.db else _U16


def _linear_rip(regs: s.kvm_regs, sregs: s.kvm_sregs) -> int:
    """CS base + RIP (the base is ignored for 64-bit code segments)."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return int(regs.rip) & _U64
    return (int(sregs.cs.base) + (int(regs.rip) & _ip_mask(sregs))) & _U32


def read_guest_insn(vcpu: VcpuFd, mem: GuestMemory, linear: int) -> bytes:
    """Up to MAX_INSN_LEN bytes at guest-linear `linear`, page by page via KVM_TRANSLATE.

    Stops early (shorter result) at an unmapped page or at anything GuestMemory refuses.
    """
    out = b""
    while len(out) < MAX_INSN_LEN:
        addr = (linear + len(out)) & _U64
        chunk = min(MAX_INSN_LEN - len(out), PAGE_SIZE - addr % PAGE_SIZE)
        try:
            tr = vcpu.translate(addr)
        except KvmError:
            break
        if not tr.valid:
            break
        try:
            out += mem.read_exact(int(tr.physical_address), chunk)
        except GuestMemoryError:
            break
    return out


def faulting_insn(vcpu: VcpuFd, mem: GuestMemory, regs: s.kvm_regs, sregs: s.kvm_sregs) -> bytes:
    """The bytes of the instruction the emulator failed on (at most MAX_INSN_LEN)."""
    failure = vcpu.kvm_run.exit.emulation_failure
    size = int(failure.insn_size)
    if failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES and size > 0:
        # SAFETY: a copy out of the kvm_run page, bounded by the array's 15 bytes.
        return bytes(failure.insn_bytes[: min(size, MAX_INSN_LEN)])
    return read_guest_insn(vcpu, mem, _linear_rip(regs, sregs))


def _assist_int3(vcpu: VcpuFd, regs: s.kvm_regs, sregs: s.kvm_sregs) -> bool:
    events = vcpu.get_vcpu_events()
    if (
        events.exception.injected
        or events.exception.pending
        or events.interrupt.injected
        or events.nmi.injected
    ):
        return False  # an event is already in flight: do not reorder or clobber it
    regs.rip = (int(regs.rip) + 1) & _ip_mask(sregs)
    vcpu.set_regs(regs)
    events.exception.injected = 1
    events.exception.nr = VECTOR_BP
    events.exception.has_error_code = 0
    events.exception.error_code = 0
    events.exception.pending = 0
    # flags = 0: only the exception/interrupt/NMI-injection fields are written back; the
    # interrupt shadow, pending NMI, SIPI vector and SMM state stay as they are.
    events.flags = 0
    vcpu.set_vcpu_events(events)
    return True


def _assist_fwait(vcpu: VcpuFd, regs: s.kvm_regs, sregs: s.kvm_sregs) -> bool:
    if sregs.cr0 & CR0_TS and sregs.cr0 & CR0_MP:
        return False  # hardware raises #NM here; the VMM does not emulate that
    if vcpu.get_fpu().fsw & FSW_ES:
        return False  # hardware raises #MF here
    regs.rip = (int(regs.rip) + 1) & _ip_mask(sregs)
    vcpu.set_regs(regs)
    return True


def try_assist(vcpu: VcpuFd, mem: GuestMemory, enabled: frozenset[str]) -> str | None:
    """Apply an assist for the emulation failure in vcpu's kvm_run; its name, or None.

    Call only right after KVM_RUN returned; on None the vCPU state is unchanged.
    """
    run = vcpu.kvm_run
    if not enabled & ASSISTS or run.exit_reason != ExitReason.INTERNAL_ERROR:
        return None
    if run.exit.internal.suberror != InternalSuberror.EMULATION:
        return None
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    insn = faulting_insn(vcpu, mem, regs, sregs)
    if not insn:
        return None
    # Only the exact one-byte forms: a prefix in front changes nothing architecturally for
    # these two, but no real code emits one, so refusing is the safe reading.
    if insn[0] == OPCODE_INT3 and ASSIST_INT3 in enabled:
        return ASSIST_INT3 if _assist_int3(vcpu, regs, sregs) else None
    if insn[0] == OPCODE_FWAIT and ASSIST_FWAIT in enabled:
        return ASSIST_FWAIT if _assist_fwait(vcpu, regs, sregs) else None
    return None
