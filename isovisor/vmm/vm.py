"""A VM: the KVM VM fd, its guest memory, buses, irqchip and vCPUs, and how it stops."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from isovisor.devices.bus import Bus, mmio_bus, pio_bus
from isovisor.devices.events import SecurityEventLog
from isovisor.devices.irq import CallbackLine
from isovisor.kvm import Kvm, VcpuFd, VmFd
from isovisor.kvm import constants as c
from isovisor.memory import GuestMemory
from isovisor.memory.layout import KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR
from isovisor.vmm.stop import StopEvent, StopReason
from isovisor.vmm.vcpu import AssistFn, Vcpu, install_kick_handler

log = logging.getLogger(__name__)

MAX_VCPUS = 64  # the MADT/CPUID topology isovisor builds; KVM may allow more
# The IOAPIC has 24 pins; ISA IRQs 0-15 also reach the PIC.
IOAPIC_PINS = 24


class VmError(Exception):
    """The VM could not be created as asked (a clear sentence, no traceback needed)."""


class Vm:
    def __init__(self, kvm: Kvm, memory_size: int, vcpu_count: int) -> None:
        if not 1 <= vcpu_count <= min(MAX_VCPUS, kvm.max_vcpus):
            raise VmError(
                f"--vcpus {vcpu_count} is outside 1..{min(MAX_VCPUS, kvm.max_vcpus)} on this host"
            )
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()
        self.kvm = kvm
        self.vcpu_count = vcpu_count
        self.fd = VmFd(kvm.create_vm())
        self.memory: GuestMemory | None = None
        self.vcpus: list[Vcpu] = []
        self._vcpu_fds: list[VcpuFd] = []
        self.pio: Bus = pio_bus()
        self.mmio: Bus = mmio_bus()
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self.stop_event: StopEvent | None = None
        self.stop_listeners: list[Callable[[StopEvent], None]] = []
        self.security_events = SecurityEventLog()
        self._eventfds: list[int] = []
        try:
            self.fd.set_tss_addr(KVM_TSS_ADDR)
            self.fd.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
            self.fd.create_irqchip()
            self.fd.create_pit2(c.KVM_PIT_SPEAKER_DUMMY)
            self.memory = GuestMemory(memory_size)
            self.memory.register(self.fd)
            for i in range(vcpu_count):
                self._vcpu_fds.append(VcpuFd(self.fd.create_vcpu(i), kvm.vcpu_mmap_size))
        except BaseException:
            self.close()
            raise

    @property
    def mem(self) -> GuestMemory:
        assert self.memory is not None, "VM is closed"
        return self.memory

    @property
    def vcpu_fds(self) -> list[VcpuFd]:
        return list(self._vcpu_fds)

    def irq_line(self, irq: int) -> CallbackLine:
        """An interrupt line into the in-kernel PIC/IOAPIC (pin `irq`)."""
        if not 0 <= irq < IOAPIC_PINS:
            raise VmError(f"IRQ {irq} is outside 0..{IOAPIC_PINS - 1}")
        return CallbackLine(irq, self.fd.irq_line)

    def ioeventfd(self, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False) -> int:
        """An eventfd KVM signals when the guest writes `length` bytes at `addr` (matching
        `datamatch` if given) without an exit to userspace. The VM owns and closes it."""
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.fd.ioeventfd(efd, addr, length, pio=pio, datamatch=datamatch)
        except BaseException:
            os.close(efd)
            raise
        self._eventfds.append(efd)
        return efd

    def irqfd(self, gsi: int) -> int:
        """An eventfd that injects an edge on interrupt pin `gsi` when written (from any
        thread, without an ioctl on the data path). The VM owns and closes it."""
        if not 0 <= gsi < IOAPIC_PINS:
            raise VmError(f"GSI {gsi} is outside 0..{IOAPIC_PINS - 1}")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.fd.irqfd(efd, gsi)
        except BaseException:
            os.close(efd)
            raise
        self._eventfds.append(efd)
        return efd

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, assist: AssistFn | None = None) -> None:
        self.vcpus = [
            Vcpu(i, fd, self.pio, self.mmio, self.request_stop, assist)
            for i, fd in enumerate(self._vcpu_fds)
        ]
        for v in self.vcpus:
            v.start()

    def request_stop(self, event: StopEvent) -> None:
        """Stop the VM for `event`; the first reason wins. Safe from any thread."""
        with self._stop_lock:
            if self.stop_event is not None:
                return
            self.stop_event = event
        log.info("VM stopping: %s", event.describe())
        for v in self.vcpus:
            v.stop()
        for listener in self.stop_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("stop listener failed")
        self._stopped.set()

    def stop(self, detail: str = "stop requested by the host") -> None:
        self.request_stop(StopEvent(StopReason.HOST_REQUEST, None, detail))

    def pause(self) -> bool:
        return all(v.pause() for v in self.vcpus)

    def resume(self) -> None:
        for v in self.vcpus:
            v.resume()

    def wait(self, timeout: float | None = None) -> StopEvent | None:
        """Block until the VM stops (or timeout); joins the vCPU threads once stopped."""
        if not self._stopped.wait(timeout):
            return None
        for v in self.vcpus:
            v.join(5.0)
        return self.stop_event

    def close(self) -> None:
        """Stop vCPUs, close their fds, scrub and release guest memory, close the VM fd."""
        if self.vcpus and self.stop_event is None:
            self.stop("VM closed")
        for v in self.vcpus:
            v.join(5.0)
        for fd in self._vcpu_fds:
            fd.close()
        self._vcpu_fds = []
        self.fd.close()  # drops KVM's irqfd/ioeventfd references before we close ours
        for efd in self._eventfds:
            os.close(efd)
        self._eventfds = []
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
