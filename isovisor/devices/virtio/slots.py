"""Where virtio-mmio devices live in a VM: one 4 KiB window and one GSI each.

Windows start at layout.VIRTIO_MMIO_BASE and follow each other (base + n * 4 KiB), inside
the 32-bit MMIO hole; GSIs are IOAPIC pins 16-23, which no ISA device uses, so one pin per
device and no sharing. The same records feed the ACPI DSDT (one LNRO0005 device per slot:
Memory32Fixed(base, size) and an edge-triggered Interrupt(gsi), matching the irqfd's edge)
and, for kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, the command line.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from isovisor.devices.bus import Bus
from isovisor.devices.events import SecurityEventSink
from isovisor.devices.virtio.constants import MMIO_WINDOW_SIZE
from isovisor.devices.virtio.device import VirtioDevice
from isovisor.devices.virtio.mmio import VirtioMmioTransport
from isovisor.memory import GuestMemory
from isovisor.memory.layout import MMIO_HOLE_END, MMIO_HOLE_START, VIRTIO_MMIO_BASE

FIRST_GSI = 16
LAST_GSI = 23
MAX_DEVICES = LAST_GSI - FIRST_GSI + 1
assert MMIO_HOLE_START <= VIRTIO_MMIO_BASE
assert VIRTIO_MMIO_BASE + MAX_DEVICES * MMIO_WINDOW_SIZE <= MMIO_HOLE_END


class MmioSlot(NamedTuple):
    base: int
    size: int
    gsi: int

    def cmdline(self) -> str:
        """The Linux `virtio_mmio.device=` parameter for this slot."""
        return f"virtio_mmio.device={self.size // 1024}K@{self.base:#x}:{self.gsi}"


def virtio_mmio_slot(n: int) -> MmioSlot:
    """The n-th virtio-mmio slot (0-based)."""
    if not 0 <= n < MAX_DEVICES:
        raise ValueError(f"at most {MAX_DEVICES} virtio-mmio devices (GSIs {FIRST_GSI}-{LAST_GSI})")
    return MmioSlot(VIRTIO_MMIO_BASE + n * MMIO_WINDOW_SIZE, MMIO_WINDOW_SIZE, FIRST_GSI + n)


def virtio_mmio_slots(count: int) -> list[MmioSlot]:
    """The first `count` slots, in order."""
    return [virtio_mmio_slot(i) for i in range(count)]


class VirtioHost(Protocol):
    """What attaching a device needs from a VM (isovisor.vmm.vm.Vm satisfies it)."""

    @property
    def mem(self) -> GuestMemory: ...

    @property
    def mmio(self) -> Bus: ...

    @property
    def security_events(self) -> SecurityEventSink: ...

    def ioeventfd(
        self, addr: int, length: int, *, datamatch: int | None = None, pio: bool = False
    ) -> int: ...

    def irqfd(self, gsi: int) -> int: ...


def attach_virtio_mmio(vm: VirtioHost, device: VirtioDevice, slot: MmioSlot) -> VirtioMmioTransport:
    """Put `device` behind a virtio-mmio transport at `slot` on the VM's MMIO bus, with its
    notify ioeventfds and irqfd from the VM. Call `transport.close()` before the VM's guest
    memory goes away (it stops the device's I/O thread)."""
    transport = VirtioMmioTransport(
        device, vm.mem, base=slot.base, gsi=slot.gsi, eventfds=vm, events=vm.security_events
    )
    vm.mmio.register(slot.base, slot.size, transport, transport.source)
    return transport
