"""Register traffic for port-I/O and MMIO device models: a sequence of reads and writes at
fuzzed offsets and widths, with the checks every BusDevice must pass (never raise, reads
return exactly the size asked for)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from fuzz.data import Data

SIZES = (1, 2, 4, 8, 1, 1, 3, 0)  # mostly what CPUs do, sometimes what they never do
MAX_OPS = 512


class Device(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


def run(d: Data, devices: Sequence[tuple[Device, int]],
        host_op: Callable[[Data], None] | None = None,
        offsets: Callable[[Data, int], int] | None = None) -> int:
    """Replay ops from `d` on (device, window length) pairs; returns the ops done."""
    ops = 0
    while not d.exhausted and ops < MAX_OPS:
        ops += 1
        op = d.u8()
        if host_op is not None and op % 8 == 7:
            host_op(d)
            continue
        dev, length = devices[(op >> 3) % len(devices)]
        off = offsets(d, length) if offsets is not None else d.u8() % (length + 2)
        size = SIZES[d.u8() % len(SIZES)]
        if op & 1:
            dev.write(off, d.take(size))
        else:
            got = dev.read(off, size)
            assert isinstance(got, bytes) and len(got) == size, \
                f"read of {size} bytes at {off:#x} returned {got!r}"
    return ops
