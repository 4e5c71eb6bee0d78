"""vCPU-level ioctls and the shared kvm_run page."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable

from isovisor.kvm import constants as c
from isovisor.kvm import structs as s
from isovisor.kvm.ioctl import ioctl, raw_ioctl
from isovisor.kvm.system import CpuidEntry, cpuid_to_struct


class VcpuFd:
    """A KVM vCPU fd plus its mmap'ed kvm_run page."""

    def __init__(self, fd: int, mmap_size: int) -> None:
        self.fd = fd
        self._run_page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # SAFETY: the kvm_run page is mapped for the lifetime of this object; the structure
        # view covers sizeof(kvm_run) <= mmap_size bytes; it is dropped before unmapping.
        self.run: s.kvm_run | None = s.kvm_run.from_buffer(self._run_page)

    @property
    def kvm_run(self) -> s.kvm_run:
        assert self.run is not None, "vCPU is closed"
        return self.run

    def io_data(self, offset: int, length: int) -> memoryview:
        """The PIO data area inside the kvm_run mapping (checked against the mapping)."""
        if offset < 0 or length < 0 or offset + length > len(self._run_page):
            raise ValueError(f"PIO data at {offset}+{length} lies outside the kvm_run page")
        return memoryview(self._run_page)[offset : offset + length]

    def close(self) -> None:
        self.run = None
        if not self._run_page.closed:
            try:
                self._run_page.close()
            except BufferError:
                pass  # a view is still exported; unmapped when the last one goes
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def run_page(self) -> mmap.mmap:
        """The raw kvm_run mapping (port-I/O data lives at exit.io.data_offset)."""
        return self._run_page

    def fast_runner(self) -> Callable[[], int]:
        """KVM_RUN for the vCPU loop's hot path: returns 0, or the errno (no exception,
        no per-call allocation). The GIL is released for the call (ctypes CDLL)."""
        fd, request, call, get_errno = self.fd, c.KVM_RUN, raw_ioctl, ctypes.get_errno

        def run() -> int:
            if call(fd, request, None) < 0:
                return int(get_errno())
            return 0

        return run

    def run_once(self) -> int:
        """KVM_RUN (GIL released). Returns 0, or -EINTR when a signal/immediate_exit cut in."""
        try:
            ioctl(self.fd, c.KVM_RUN, retry_eintr=False)
        except Exception as exc:
            if getattr(exc, "errno", None) == 4:  # EINTR: kicked
                return -4
            raise
        return 0

    def get_regs(self) -> s.kvm_regs:
        r = s.kvm_regs()
        ioctl(self.fd, c.KVM_GET_REGS, r)
        return r

    def set_regs(self, r: s.kvm_regs) -> None:
        ioctl(self.fd, c.KVM_SET_REGS, r)

    def get_sregs(self) -> s.kvm_sregs:
        r = s.kvm_sregs()
        ioctl(self.fd, c.KVM_GET_SREGS, r)
        return r

    def set_sregs(self, r: s.kvm_sregs) -> None:
        ioctl(self.fd, c.KVM_SET_SREGS, r)

    def get_fpu(self) -> s.kvm_fpu:
        f = s.kvm_fpu()
        ioctl(self.fd, c.KVM_GET_FPU, f)
        return f

    def set_fpu(self, f: s.kvm_fpu) -> None:
        ioctl(self.fd, c.KVM_SET_FPU, f)

    def get_lapic(self) -> s.kvm_lapic_state:
        st = s.kvm_lapic_state()
        ioctl(self.fd, c.KVM_GET_LAPIC, st)
        return st

    def set_lapic(self, st: s.kvm_lapic_state) -> None:
        ioctl(self.fd, c.KVM_SET_LAPIC, st)

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        ioctl(self.fd, c.KVM_SET_CPUID2, cpuid_to_struct(entries))

    def _msrs(self, entries: list[tuple[int, int]]) -> ctypes.Structure:
        class _Msrs(ctypes.Structure):
            _fields_ = [
                ("nmsrs", ctypes.c_uint32),
                ("pad", ctypes.c_uint32),
                ("entries", s.kvm_msr_entry * max(len(entries), 1)),
            ]

        buf = _Msrs()
        buf.nmsrs = len(entries)
        for i, (index, data) in enumerate(entries):
            buf.entries[i].index = index
            buf.entries[i].data = data
        return buf

    def set_msrs(self, entries: list[tuple[int, int]]) -> int:
        """Returns how many MSRs KVM accepted (it stops at the first it rejects)."""
        return ioctl(self.fd, c.KVM_SET_MSRS, self._msrs(entries))

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = self._msrs([(i, 0) for i in indices])
        n = ioctl(self.fd, c.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def get_mp_state(self) -> int:
        st = s.kvm_mp_state()
        ioctl(self.fd, c.KVM_GET_MP_STATE, st)
        return int(st.mp_state)

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, c.KVM_SET_MP_STATE, s.kvm_mp_state(state))

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        ev = s.kvm_vcpu_events()
        ioctl(self.fd, c.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, ev: s.kvm_vcpu_events) -> None:
        ioctl(self.fd, c.KVM_SET_VCPU_EVENTS, ev)

    def translate(self, linear: int) -> s.kvm_translation:
        t = s.kvm_translation()
        t.linear_address = linear
        ioctl(self.fd, c.KVM_TRANSLATE, t)
        return t
