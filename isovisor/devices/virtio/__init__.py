"""virtio devices over virtio-mmio: split virtqueues, the device base, the transport.

Layers inside the package (arrows point down): rng (and the other devices) -> device ->
queue -> chain -> constants; mmio uses device and queue; slots wires a transport into a VM.
"""

from isovisor.devices.virtio.chain import (
    BadRequest,
    Descriptor,
    DescriptorChain,
    GuestProtocolError,
    VirtioError,
)
from isovisor.devices.virtio.device import DeviceState, VirtioDevice, VirtioInterrupt
from isovisor.devices.virtio.mmio import DeviceEventFds, LocalEventFds, VirtioMmioTransport
from isovisor.devices.virtio.queue import QueueConfig, Virtqueue, check_layout
from isovisor.devices.virtio.rng import VirtioRng
from isovisor.devices.virtio.slots import MmioSlot, attach_virtio_mmio, virtio_mmio_slots

__all__ = [
    "BadRequest",
    "Descriptor",
    "DescriptorChain",
    "DeviceEventFds",
    "DeviceState",
    "GuestProtocolError",
    "LocalEventFds",
    "MmioSlot",
    "QueueConfig",
    "VirtioDevice",
    "VirtioError",
    "VirtioInterrupt",
    "VirtioMmioTransport",
    "VirtioRng",
    "Virtqueue",
    "attach_virtio_mmio",
    "check_layout",
    "virtio_mmio_slots",
]
