"""The virtio-mmio transport, version 2 only (virtio 1.2 §4.2).

A BusDevice on the MMIO bus, one 4 KiB window per device. Registers per §4.2.2; the
device status state machine per §2.1 and §3.1.1; queue setup checks per §2.7 and §4.2.3.2
when the driver sets QueueReady. Legacy (version 1) drivers are refused: Version reads 2
and FEATURES_OK is only accepted with VIRTIO_F_VERSION_1 negotiated.

Threads. Register accesses come from vCPU threads and are serialised by `_lock`. The
device's I/O thread only ever takes `_irq_lock` (interrupt status, NEEDS_RESET, config
generation), so a vCPU thread that resets the device while holding `_lock` can join the
I/O thread without deadlock. Interrupts leave through an irqfd (an eventfd write: no
ioctl, no vCPU exit); queue notifies arrive on ioeventfds registered with datamatch = the
queue index, and a notify that still reaches the bus (another access width) is forwarded
to the same eventfd, so the device sees one path either way.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from isovisor.devices.events import SecurityEventSink
from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.chain import GuestProtocolError
from isovisor.devices.virtio.device import SECURITY_EVENT_KIND, VirtioDevice
from isovisor.devices.virtio.queue import QueueConfig, Virtqueue, check_layout
from isovisor.memory import GuestMemory

log = logging.getLogger(__name__)

_U32 = 0xFFFF_FFFF
_DRIVER_STATUS_BITS = (
    c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK | c.STATUS_DRIVER_OK
)
# §3.1.1: the order a driver sets the status bits in, one at a time.
_NEXT_STATUS = {
    0: c.STATUS_ACKNOWLEDGE,
    c.STATUS_ACKNOWLEDGE: c.STATUS_DRIVER,
    c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER: c.STATUS_FEATURES_OK,
    c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK: c.STATUS_DRIVER_OK,
}


class DeviceEventFds(Protocol):
    """Where a transport gets its eventfds (isovisor.vmm.vm.Vm satisfies this): devices
    never call ioctls themselves."""

    def ioeventfd(
        self, addr: int, length: int, *, datamatch: int | None = None, pio: bool = False
    ) -> int: ...

    def irqfd(self, gsi: int) -> int: ...


class LocalEventFds:
    """Plain eventfds with no KVM behind them (unit tests; the owner closes them)."""

    def __init__(self) -> None:
        self.ioeventfds: dict[tuple[int, int | None], int] = {}
        self.irqfds: dict[int, int] = {}

    def _new(self) -> int:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def ioeventfd(
        self, addr: int, length: int, *, datamatch: int | None = None, pio: bool = False
    ) -> int:
        fd = self.ioeventfds[(addr, datamatch)] = self._new()
        return fd

    def irqfd(self, gsi: int) -> int:
        fd = self.irqfds[gsi] = self._new()
        return fd

    def close(self) -> None:
        for fd in [*self.ioeventfds.values(), *self.irqfds.values()]:
            os.close(fd)
        self.ioeventfds.clear()
        self.irqfds.clear()


@dataclass
class MmioStats:
    bad_accesses: int = 0  # wrong width/alignment, writes to R, reads of W registers
    rejected_status: int = 0  # out-of-order or unknown status writes (§2.1.1, §3.1.1)
    refused_features: int = 0  # FEATURES_OK refused (legacy, or bits not offered)
    ignored_queue_writes: int = 0  # queue registers written outside queue setup
    fallback_notifies: int = 0  # QueueNotify writes that reached the bus
    interrupts: int = 0  # irqfd writes
    resets: int = 0


class VirtioMmioTransport:
    """One virtio device behind a virtio-mmio register window."""

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        *,
        base: int,
        gsi: int,
        eventfds: DeviceEventFds,
        events: SecurityEventSink,
    ) -> None:
        self.device = device
        self.mem = mem
        self.base = base
        self.gsi = gsi
        self.events = events
        device.source = f"{device.name}@{base:#x}"
        self.source = device.source
        n = len(device.queue_max_sizes)
        # The notify eventfds: one per queue, matched on the queue index (§4.2.3.3).
        self.notify_fds: tuple[int, ...] = tuple(
            eventfds.ioeventfd(base + c.MMIO_QUEUE_NOTIFY, 4, datamatch=i) for i in range(n)
        )
        self.irq_fd = eventfds.irqfd(gsi)
        self.stats = MmioStats()
        self._lock = threading.Lock()
        self._irq_lock = threading.Lock()
        self.queues = [QueueConfig(m) for m in device.queue_max_sizes]
        self._zero_state()

    def _zero_state(self) -> None:
        """Every register as after reset (§4.2.2.1: InterruptStatus and QueueReady clear)."""
        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        for q in self.queues:
            q.reset()
        with self._irq_lock:
            self._interrupt_status = 0
            self._needs_reset = False
            self._config_generation = 0

    # --- VirtioInterrupt (any thread) ---------------------------------------------------

    def _raise(self, bits: int) -> None:
        with self._irq_lock:
            self._interrupt_status |= bits
            self.stats.interrupts += 1
            try:
                os.eventfd_write(self.irq_fd, 1)
            except OSError:  # counter saturated (nobody consumes it): the bit is set
                pass

    def signal_used_buffer(self) -> None:
        self._raise(c.INT_USED_BUFFER)

    def signal_config_change(self) -> None:
        with self._irq_lock:
            self._config_generation = (self._config_generation + 1) & _U32
        self._raise(c.INT_CONFIG_CHANGE)

    def set_needs_reset(self) -> None:
        """§2.1.2: set DEVICE_NEEDS_RESET; once DRIVER_OK, tell the driver by a
        configuration change notification."""
        with self._irq_lock:
            self._needs_reset = True
        if self._status & c.STATUS_DRIVER_OK:
            self._raise(c.INT_CONFIG_CHANGE)

    def _protocol_error(self, detail: str) -> None:
        """A broken driver seen by the transport itself (bad queue setup)."""
        self.events.report(SECURITY_EVENT_KIND, self.source, detail)
        self.set_needs_reset()

    # --- state read by tests and the VMM -----------------------------------------------

    @property
    def status(self) -> int:
        with self._irq_lock:
            return self._status | (c.STATUS_DEVICE_NEEDS_RESET if self._needs_reset else 0)

    @property
    def interrupt_status(self) -> int:
        with self._irq_lock:
            return self._interrupt_status

    @property
    def config_generation(self) -> int:
        with self._irq_lock:
            return self._config_generation

    # --- BusDevice ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset >= c.MMIO_CONFIG:
            return self.device.read_config(offset - c.MMIO_CONFIG, size)
        if size != 4 or offset % 4:
            # §4.2.2.2: control registers are accessed 32 bits wide and aligned only.
            self.stats.bad_accesses += 1
            return bytes(size)
        with self._lock:
            return struct.pack("<I", self._read_register(offset) & _U32)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= c.MMIO_CONFIG:
            self.device.write_config(offset - c.MMIO_CONFIG, data)
            return
        if offset == c.MMIO_QUEUE_NOTIFY and len(data) in (1, 2, 4):
            self._notify(int.from_bytes(data, "little"))
            return
        if len(data) != 4 or offset % 4:
            self.stats.bad_accesses += 1
            return
        value = int.from_bytes(data, "little")
        with self._lock:
            self._write_register(offset, value)

    # --- registers ---------------------------------------------------------------------

    def _selected(self) -> QueueConfig | None:
        return self.queues[self._queue_sel] if self._queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        q = self._selected()
        if offset == c.MMIO_MAGIC_VALUE:
            return c.MMIO_MAGIC
        if offset == c.MMIO_VERSION:
            return c.MMIO_VERSION_MODERN
        if offset == c.MMIO_DEVICE_ID:
            return self.device.device_type
        if offset == c.MMIO_VENDOR_ID:
            return c.MMIO_VENDOR
        if offset == c.MMIO_DEVICE_FEATURES:
            if self._device_features_sel > 1:
                return 0
            return self.device.avail_features >> (32 * self._device_features_sel)
        if offset == c.MMIO_QUEUE_NUM_MAX:
            return q.max_size if q else 0  # §4.2.2: 0 = "the queue is not available"
        if offset == c.MMIO_QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == c.MMIO_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == c.MMIO_STATUS:
            return self.status
        if offset in (c.MMIO_SHM_LEN_LOW, c.MMIO_SHM_LEN_HIGH):
            return _U32  # §4.2.2: no shared memory regions: length -1
        if offset in (c.MMIO_SHM_BASE_LOW, c.MMIO_SHM_BASE_HIGH):
            return _U32
        if offset == c.MMIO_QUEUE_RESET:
            return 0
        if offset == c.MMIO_CONFIG_GENERATION:
            return self.config_generation
        self.stats.bad_accesses += 1  # write-only or undefined (§4.2.2.2)
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == c.MMIO_DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == c.MMIO_DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == c.MMIO_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == c.MMIO_QUEUE_SEL:
            self._queue_sel = value
        elif offset == c.MMIO_QUEUE_READY:
            self._write_queue_ready(value)
        elif offset in _QUEUE_FIELDS:
            self._write_queue_field(offset, value)
        elif offset == c.MMIO_INTERRUPT_ACK:
            with self._irq_lock:
                self._interrupt_status &= ~value
        elif offset == c.MMIO_STATUS:
            self._write_status(value)
        elif offset in (c.MMIO_SHM_SEL, c.MMIO_QUEUE_RESET):
            pass  # no shared memory, no VIRTIO_F_RING_RESET: nothing to select or reset
        else:
            self.stats.bad_accesses += 1  # read-only or undefined (§4.2.2.2)

    def _write_driver_features(self, value: int) -> None:
        # §3.1.1 step 5: features are written after DRIVER and before FEATURES_OK.
        s = self._status
        if not s & c.STATUS_DRIVER or s & (c.STATUS_FEATURES_OK | c.STATUS_FAILED):
            self.stats.bad_accesses += 1
            return
        if self._driver_features_sel > 1:
            return  # no feature bits above 63: ignore (a later FEATURES_OK check suffices)
        shift = 32 * self._driver_features_sel
        self._driver_features = (self._driver_features & ~(_U32 << shift)) | (value << shift)

    def _queue_setup_open(self, q: QueueConfig | None) -> bool:
        # §3.1.1 step 7 (after FEATURES_OK, before DRIVER_OK) and §4.2.2.2 (not while
        # QueueReady is set).
        s = self._status
        if q is None or q.ready or self._needs_reset:
            return False
        return bool(s & c.STATUS_FEATURES_OK) and not s & (c.STATUS_DRIVER_OK | c.STATUS_FAILED)

    def _write_queue_field(self, offset: int, value: int) -> None:
        q = self._selected()
        if q is None or not self._queue_setup_open(q):
            self.stats.ignored_queue_writes += 1
            return
        if offset == c.MMIO_QUEUE_NUM:
            q.size = value
            return
        attr, high = _QUEUE_FIELDS[offset]
        old: int = getattr(q, attr)
        if high:
            setattr(q, attr, (old & _U32) | (value << 32))
        else:
            setattr(q, attr, (old & ~_U32) | value)

    def _write_queue_ready(self, value: int) -> None:
        q = self._selected()
        if q is None:
            self.stats.ignored_queue_writes += 1
            return
        if value == 0:
            if q.ready and self._status & c.STATUS_DRIVER_OK:
                # §4.2.2.1: the device must not touch a queue once QueueReady is 0.
                self.device.reset()
            q.ready = False
            return
        if not self._queue_setup_open(q):
            self.stats.ignored_queue_writes += 1
            return
        try:
            check_layout(self.mem, q)
        except GuestProtocolError as exc:
            self._protocol_error(f"queue {self._queue_sel} setup refused: {exc}")
            return
        q.ready = True

    def _notify(self, value: int) -> None:
        """QueueNotify reached the bus (the ioeventfd did not match): same eventfd."""
        if value < len(self.notify_fds):
            self.stats.fallback_notifies += 1
            os.eventfd_write(self.notify_fds[value], 1)
        else:
            self.stats.bad_accesses += 1

    # --- device status (§2.1, §3.1.1) ---------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset_locked()  # §2.4: writing 0 resets the device
            return
        value &= ~c.STATUS_DEVICE_NEEDS_RESET  # the device's bit: a driver cannot set it
        cur = self._status
        if value & c.STATUS_FAILED:
            # §2.1: the driver gave up on the device; stop serving until reset.
            if cur & c.STATUS_DRIVER_OK:
                self.device.reset()
            self._status = cur | c.STATUS_FAILED
            return
        added, removed = value & ~cur, cur & ~value
        if (
            value & ~_DRIVER_STATUS_BITS
            or cur & c.STATUS_FAILED
            or removed  # §2.1.1: the driver MUST NOT clear a device status bit
            or (added and _NEXT_STATUS.get(cur) != added)  # one step at a time, in order
        ):
            self.stats.rejected_status += 1
            return
        if added == c.STATUS_FEATURES_OK and not self._accept_features():
            self.stats.refused_features += 1
            return  # §3.1.1 step 6: the driver re-reads status and sees no FEATURES_OK
        if added == c.STATUS_DRIVER_OK:
            if self._needs_reset:
                self.stats.rejected_status += 1
                return
            self._status = value
            self._activate()
            return
        self._status = value

    def _accept_features(self) -> bool:
        f = self._driver_features
        dev = self.device
        # §2.2.1: a driver accepts only offered bits; §6 / §4.2: VIRTIO_F_VERSION_1 is
        # required (no legacy interface here).
        if not f & c.F_VERSION_1 or f & ~dev.avail_features:
            return False
        try:
            ok = dev.features_ok(f)
        except Exception:
            log.exception("%s: features_ok failed", self.source)
            return False
        if ok:
            dev.acked_features = f
        return ok

    def _activate(self) -> None:
        dev = self.device
        event_idx = bool(dev.acked_features & c.F_EVENT_IDX)
        indirect = bool(dev.acked_features & c.F_INDIRECT_DESC)
        try:
            queues = [
                Virtqueue(self.mem, q, event_idx=event_idx, indirect=indirect)
                if q.ready
                else None
                for q in self.queues
            ]
        except GuestProtocolError as exc:  # checked at QueueReady already: defence in depth
            self._protocol_error(f"activation refused: {exc}")
            return
        dev.activate(self.mem, queues, self, self.notify_fds)

    def reset(self) -> None:
        """Return device and transport to the zero state (as a status write of 0 does)."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self.stats.resets += 1
        self.device.reset()  # joins the I/O thread, which only ever takes _irq_lock
        self._zero_state()

    def close(self) -> None:
        """Stop the device (VM teardown). The eventfds belong to whoever created them."""
        self.device.reset()


# Queue address registers -> (QueueConfig attribute, is the high word).
_QUEUE_FIELDS: dict[int, tuple[str, bool]] = {
    c.MMIO_QUEUE_NUM: ("size", False),
    c.MMIO_QUEUE_DESC_LOW: ("desc_table", False),
    c.MMIO_QUEUE_DESC_HIGH: ("desc_table", True),
    c.MMIO_QUEUE_DRIVER_LOW: ("avail_ring", False),
    c.MMIO_QUEUE_DRIVER_HIGH: ("avail_ring", True),
    c.MMIO_QUEUE_DEVICE_LOW: ("used_ring", False),
    c.MMIO_QUEUE_DEVICE_HIGH: ("used_ring", True),
}

