"""A stand-in for isovisor.kvm.VcpuFd: a real kvm_run layout in an anonymous mapping, with
exits scripted from the fuzz input instead of KVM_RUN (guest-controlled fields only: KVM
itself, which fills data_offset and friends, is trusted)."""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Callable

from fuzz.data import Data
from isovisor.kvm import constants as kc
from isovisor.kvm import structs as s

PAGE = 4096
PIO_DATA_OFFSET = PAGE  # where KVM puts port-I/O data: the page after kvm_run


class FakeVcpuFd:
    def __init__(self) -> None:
        self.fd = -1
        self._run_page = mmap.mmap(-1, 3 * PAGE)
        # SAFETY: the mapping lives as long as this object; the view covers sizeof(kvm_run).
        self.run: s.kvm_run | None = s.kvm_run.from_buffer(self._run_page)
        self.regs = s.kvm_regs()
        self.sregs = s.kvm_sregs()
        self.events = s.kvm_vcpu_events()
        self.fpu = s.kvm_fpu()
        self.translation_valid = True
        self.translation_offset = 0
        self.writes: list[str] = []  # state-changing calls made on this vCPU
        self.script: Callable[[s.kvm_run], bool] = lambda _run: False
        self.on_exhausted: Callable[[], None] = lambda: None

    @property
    def kvm_run(self) -> s.kvm_run:
        assert self.run is not None
        return self.run

    @property
    def run_page(self) -> mmap.mmap:
        return self._run_page

    def io_data(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > len(self._run_page):
            raise ValueError(f"PIO data at {offset}+{length} lies outside the kvm_run page")
        return memoryview(self._run_page)[offset:offset + length]

    def fast_runner(self) -> Callable[[], int]:
        def run() -> int:
            if self.script(self.kvm_run):
                return 0
            self.on_exhausted()
            return errno.EINTR

        return run

    def get_regs(self) -> s.kvm_regs:
        return s.kvm_regs.from_buffer_copy(bytes(self.regs))

    def set_regs(self, r: s.kvm_regs) -> None:
        self.writes.append("regs")
        self.regs = s.kvm_regs.from_buffer_copy(bytes(r))

    def get_sregs(self) -> s.kvm_sregs:
        return s.kvm_sregs.from_buffer_copy(bytes(self.sregs))

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        return s.kvm_vcpu_events.from_buffer_copy(bytes(self.events))

    def set_vcpu_events(self, ev: s.kvm_vcpu_events) -> None:
        self.writes.append("events")
        self.events = s.kvm_vcpu_events.from_buffer_copy(bytes(ev))

    def get_fpu(self) -> s.kvm_fpu:
        return s.kvm_fpu.from_buffer_copy(bytes(self.fpu))

    def translate(self, linear: int) -> s.kvm_translation:
        t = s.kvm_translation()
        t.linear_address = linear
        t.physical_address = (linear + self.translation_offset) % (1 << 64)
        t.valid = int(self.translation_valid)
        return t

    def close(self) -> None:
        self.run = None


def fill_struct(obj: ctypes.Structure, raw: bytes) -> None:
    ctypes.memmove(ctypes.addressof(obj), raw, min(len(raw), ctypes.sizeof(obj)))


EXIT_CHOICES = (
    kc.ExitReason.IO, kc.ExitReason.IO, kc.ExitReason.IO, kc.ExitReason.MMIO,
    kc.ExitReason.MMIO, kc.ExitReason.MMIO, kc.ExitReason.INTR, kc.ExitReason.HLT,
    kc.ExitReason.INTERNAL_ERROR, kc.ExitReason.SYSTEM_EVENT, kc.ExitReason.SHUTDOWN,
    kc.ExitReason.FAIL_ENTRY,
)


def script_exit(d: Data, run: s.kvm_run, ports: list[int], windows: list[int]) -> None:
    """Fill `run` with one exit taken from `d` (addresses biased to what is registered)."""
    sel = d.u8()
    reason = int(EXIT_CHOICES[sel % len(EXIT_CHOICES)]) if sel < 0xF0 else d.u8()
    run.exit_reason = reason
    ex = run.exit
    if reason == kc.ExitReason.IO:
        io = ex.io
        io.direction = d.u8() & 1
        io.size = (1, 2, 4, 1, 2, 4, 3, 8)[d.u8() % 8]
        io.port = ports[d.u8() % len(ports)] + d.u8() % 10 if d.flag() else d.u16()
        max_count = max(1, PAGE // max(io.size, 1))
        io.count = 1 if d.u8() < 0xC0 else 1 + d.u16() % max_count
        io.data_offset = PIO_DATA_OFFSET
    elif reason == kc.ExitReason.MMIO:
        m = ex.mmio
        m.phys_addr = windows[d.u8() % len(windows)] + d.u16() % 0x1100 if d.flag() else d.u64()
        m.len = (1, 2, 4, 8, 4, 4, 3, 16)[d.u8() % 8]
        m.is_write = d.u8() & 1
        for i, b in enumerate(d.take(8)):
            m.data[i] = b
    elif reason == kc.ExitReason.INTERNAL_ERROR:
        fill_struct(ex.emulation_failure, d.take(40))
    elif reason == kc.ExitReason.SYSTEM_EVENT:
        ex.system_event.type = d.u8() % 6
    else:
        fill_struct(ex.fail_entry, d.take(12))
