"""Port-I/O and MMIO buses: address ranges -> device models.

Overlapping registrations are refused. An access nobody claims reads as all-ones and a
write nobody claims is dropped; both are counted. A device that raises is contained here:
the access completes as unclaimed and the fault is counted and reported, so a guest can
never crash the vCPU loop through a device model.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """A device model reachable by guest port I/O or MMIO.

    `offset` is relative to the base the device was registered at. `read` returns exactly
    `size` bytes (little-endian); `write` receives the bytes the guest wrote.
    """

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(Exception):
    """A registration that would overlap another, or an invalid range."""


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    name: str
    device: BusDevice = field(compare=False)

    @property
    def end(self) -> int:
        return self.base + self.length


@dataclass
class BusStats:
    unclaimed_reads: int = 0
    unclaimed_writes: int = 0
    device_faults: int = 0


ALL_ONES = {n: b"\xff" * n for n in (1, 2, 4, 8)}
# Address spaces at most this big get a direct lookup table (the 64 Ki I/O ports).
_TABLE_LIMIT = 0x1_0000


class Bus:
    """An address space of device ranges (one for port I/O, one for MMIO)."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit  # one past the highest address (0x10000 for ports)
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._lock = threading.Lock()
        self.stats = BusStats()
        # Port I/O: each claimed address -> its range, so an exit finds its device in O(1).
        # A dict, not a 64 Ki-slot list: that list was 512 KiB of private memory per VM
        # (per jailed worker), for the dozen ports devices claim.
        self._table: dict[int, BusRange] | None = {} if limit <= _TABLE_LIMIT else None
        self._last: BusRange | None = None  # MMIO: the range hit last (device loops)

    def register(self, base: int, length: int, device: BusDevice, name: str) -> None:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusError(
                f"{self.name}: range {base:#x}+{length:#x} for {name} is outside 0..{self.limit:#x}"
            )
        with self._lock:
            new = BusRange(base, length, name, device)
            i = bisect.bisect_left(self._bases, base)
            for neighbour in self._ranges[max(i - 1, 0) : i + 1]:
                if neighbour.base < new.end and new.base < neighbour.end:
                    raise BusError(
                        f"{self.name}: {name} at {base:#x}+{length:#x} overlaps "
                        f"{neighbour.name} at {neighbour.base:#x}+{neighbour.length:#x}"
                    )
            self._ranges.insert(i, new)
            self._bases.insert(i, base)
            if self._table is not None:
                for a in range(base, base + length):
                    self._table[a] = new

    def ranges(self) -> list[BusRange]:
        with self._lock:
            return list(self._ranges)

    def find(self, addr: int) -> BusRange | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.end:
                return r
        return None

    def _lookup(self, addr: int, size: int) -> BusRange | None:
        table = self._table
        if table is not None:
            r = table.get(addr)
        else:
            r = self._last
            if r is None or not r.base <= addr < r.base + r.length:
                r = self.find(addr)
                if r is not None:
                    self._last = r
        if r is None or addr + size > r.base + r.length:
            return None  # an access straddling a range's end is not the device's
        return r

    def read(self, addr: int, size: int) -> bytes:
        r = self._lookup(addr, size)
        if r is None:
            self.stats.unclaimed_reads += 1
            return ALL_ONES.get(size) or b"\xff" * size
        try:
            data = r.device.read(addr - r.base, size)
        except Exception:
            self.stats.device_faults += 1
            log.exception("%s: %s faulted on a %d-byte read at %#x", self.name, r.name, size, addr)
            return b"\xff" * size
        if len(data) != size:
            self.stats.device_faults += 1
            log.error(
                "%s: %s returned %d bytes for a %d-byte read", self.name, r.name, len(data), size
            )
            return (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, addr: int, data: bytes) -> None:
        r = self._lookup(addr, len(data))
        if r is None:
            self.stats.unclaimed_writes += 1
            return
        try:
            r.device.write(addr - r.base, data)
        except Exception:
            self.stats.device_faults += 1
            log.exception(
                "%s: %s faulted on a %d-byte write at %#x", self.name, r.name, len(data), addr
            )


PIO_LIMIT = 0x1_0000
MMIO_LIMIT = 1 << 52


def pio_bus() -> Bus:
    return Bus("pio", PIO_LIMIT)


def mmio_bus() -> Bus:
    return Bus("mmio", MMIO_LIMIT)
