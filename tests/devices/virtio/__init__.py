"""Tests of the virtio core. `FakeDriver` plays the driver side of one split virtqueue in a
GuestMemory (descriptor table, available ring, reading the used ring); `Rig` puts a device
behind a virtio-mmio transport with plain eventfds and drives its registers."""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Callable

from isovisor.devices.events import SecurityEventLog
from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.device import VirtioDevice
from isovisor.devices.virtio.mmio import LocalEventFds, VirtioMmioTransport
from isovisor.devices.virtio.queue import QueueConfig
from isovisor.devices.virtio.rng import VirtioRng
from isovisor.memory import GuestMemory
from isovisor.memory.layout import VIRTIO_MMIO_BASE, MiB

DESC_ADDR = 0x10000
AVAIL_ADDR = 0x20000
USED_ADDR = 0x30000
BUF_ADDR = 0x100000  # buffers from 1 MiB on
OK = c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK | c.STATUS_DRIVER_OK


class FakeDriver:
    """The driver half of a split virtqueue, written straight into guest memory."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int = 16,
        *,
        desc: int = DESC_ADDR,
        avail: int = AVAIL_ADDR,
        used: int = USED_ADDR,
    ) -> None:
        self.mem = mem
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.avail_idx = 0

    def config(self, max_size: int | None = None) -> QueueConfig:
        cfg = QueueConfig(max_size or self.size)
        cfg.size = self.size
        cfg.desc_table, cfg.avail_ring, cfg.used_ring = self.desc, self.avail, self.used
        cfg.ready = True
        return cfg

    def set_desc(
        self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, *, table: int = -1
    ) -> None:
        base = self.desc if table < 0 else table
        self.mem.write_all(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def used_elem(self, i: int) -> tuple[int, int]:
        raw = self.mem.read_exact(self.used + 4 + 8 * (i % self.size), 8)
        head, length = struct.unpack("<II", raw)
        return head, length

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def writable_chain(self, head: int, addr: int, length: int) -> None:
        """One device-writable buffer as a one-descriptor chain at `head`."""
        self.set_desc(head, addr, length, c.DESC_F_WRITE)


class Rig:
    def __init__(self, dev: VirtioDevice | None = None) -> None:
        self.mem = GuestMemory(16 * MiB)
        self.events = SecurityEventLog()
        self.fds = LocalEventFds()
        self.dev = dev or VirtioRng(self.events)
        self.t = VirtioMmioTransport(
            self.dev, self.mem, base=VIRTIO_MMIO_BASE, gsi=16, eventfds=self.fds, events=self.events
        )
        self.q = FakeDriver(self.mem, 16)

    def close(self) -> None:
        self.t.close()
        self.fds.close()
        self.mem.close()

    def rd(self, off: int) -> int:
        return int(struct.unpack("<I", self.t.read(off, 4))[0])

    def wr(self, off: int, value: int) -> None:
        self.t.write(off, struct.pack("<I", value & 0xFFFF_FFFF))

    def status(self, value: int) -> int:
        self.wr(c.MMIO_STATUS, value)
        return self.rd(c.MMIO_STATUS)

    def negotiate(self, features: int = c.F_VERSION_1) -> int:
        self.status(0)
        self.status(c.STATUS_ACKNOWLEDGE)
        self.status(c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
        for sel in (0, 1):
            self.wr(c.MMIO_DRIVER_FEATURES_SEL, sel)
            self.wr(c.MMIO_DRIVER_FEATURES, features >> (32 * sel))
        return self.status(c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK)

    def setup_queue(self, index: int = 0, size: int = 16, **addrs: int) -> None:
        a = {"desc": DESC_ADDR, "avail": AVAIL_ADDR, "used": USED_ADDR, **addrs}
        self.wr(c.MMIO_QUEUE_SEL, index)
        self.wr(c.MMIO_QUEUE_NUM, size)
        for low, addr in (
            (c.MMIO_QUEUE_DESC_LOW, a["desc"]),
            (c.MMIO_QUEUE_DRIVER_LOW, a["avail"]),
            (c.MMIO_QUEUE_DEVICE_LOW, a["used"]),
        ):
            self.wr(low, addr)
            self.wr(low + 4, addr >> 32)
        self.wr(c.MMIO_QUEUE_READY, 1)

    def bring_up(self, features: int = c.F_VERSION_1) -> None:
        assert self.negotiate(features) & c.STATUS_FEATURES_OK
        self.setup_queue()
        assert self.status(OK) == OK

    def dump(self) -> dict[int, int]:
        """Every readable register, each queue's too."""
        regs = {}
        for sel in range(3):
            self.wr(c.MMIO_QUEUE_SEL, sel)
            self.wr(c.MMIO_DEVICE_FEATURES_SEL, sel)
            for off in (c.MMIO_DEVICE_FEATURES, c.MMIO_QUEUE_NUM_MAX, c.MMIO_QUEUE_READY):
                regs[off + 0x1000 * sel] = self.rd(off)
        for off in (c.MMIO_INTERRUPT_STATUS, c.MMIO_STATUS, c.MMIO_CONFIG_GENERATION):
            regs[off] = self.rd(off)
        self.wr(c.MMIO_QUEUE_SEL, 0)
        self.wr(c.MMIO_DEVICE_FEATURES_SEL, 0)
        return regs


def wait_for(pred: Callable[[], object], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.002)
    return bool(pred())


def readable(fd: int, timeout: float = 5.0) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)
