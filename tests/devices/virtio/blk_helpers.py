"""Helpers for the virtio-blk tests: images, a device on a FakeDriver queue, requests."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from isovisor.devices.events import SecurityEventLog
from isovisor.devices.ratelimit import RateLimiter
from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.blk import VirtioBlk, open_disk
from isovisor.devices.virtio.blk_disk import DiskSpec
from isovisor.devices.virtio.queue import Virtqueue
from isovisor.memory import GuestMemory
from tests.devices.virtio import BUF_ADDR, FakeDriver

N, W = c.DESC_F_NEXT, c.DESC_F_WRITE
SLOT = 0x20000  # guest bytes per request slot: header, status, then data at +0x1000


def make_image(path: Path, sectors: int = 2048, pattern: bool = True) -> Path:
    """A raw image whose sector s starts with the bytes of `s` (so reads are checkable)."""
    data = bytearray(sectors * 512)
    if pattern:
        for s in range(sectors):
            data[s * 512 : s * 512 + 8] = struct.pack("<Q", s)
            data[s * 512 + 8 : s * 512 + 512] = bytes([s & 0xFF]) * 504
    path.write_bytes(bytes(data))
    return path


def sector_bytes(s: int) -> bytes:
    return struct.pack("<Q", s) + bytes([s & 0xFF]) * 504


@dataclass
class Slot:
    head: int
    header: int
    status: int
    data: int


class BlkSetup:
    """A VirtioBlk with its queue driven directly (no transport, no thread)."""

    def __init__(
        self,
        mem: GuestMemory,
        image: Path,
        *,
        readonly: bool = False,
        direct: bool = False,
        serial: str | None = None,
        features: int | None = None,
        limiter: RateLimiter | None = None,
        queue_size: int = 16,
    ) -> None:
        self.mem = mem
        self.events = SecurityEventLog()
        self.dev: VirtioBlk = open_disk(
            DiskSpec(image, readonly=readonly, direct=direct, serial=serial), self.events,
            rate_limiter=limiter,
        )
        self.dev.acked_features = (
            self.dev.avail_features if features is None else features | c.F_VERSION_1
        )
        self.d = FakeDriver(mem, queue_size)
        self.q = Virtqueue(mem, self.d.config())

    def close(self) -> None:
        self.dev.close()

    def slot(self, head: int) -> Slot:
        base = BUF_ADDR + head * SLOT
        return Slot(head, base, base + 0x100, base + 0x1000)

    def header(self, s: Slot, rtype: int, sector: int = 0) -> None:
        self.mem.write_all(s.header, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write_u8(s.status, 0xEE)

    def simple(
        self, head: int, rtype: int, sector: int, length: int, *, writable_data: bool
    ) -> Slot:
        """The usual three-descriptor request at descriptors head, head+1, head+2 (or two
        descriptors without data)."""
        s = self.slot(head)
        self.header(s, rtype, sector)
        d = self.d
        if length:
            d.set_desc(head, s.header, 16, N, head + 1)
            d.set_desc(head + 1, s.data, length, N | (W if writable_data else 0), head + 2)
            d.set_desc(head + 2, s.status, 1, W)
        else:
            d.set_desc(head, s.header, 16, N, head + 1)
            d.set_desc(head + 1, s.status, 1, W)
        return s

    def run(self, *heads: int) -> None:
        self.d.publish(*heads)
        assert self.dev.process_queue(0, self.q)

    def status(self, s: Slot) -> int:
        return self.mem.read_u8(s.status)

    def used(self, i: int) -> tuple[int, int]:
        return self.d.used_elem(i)
