"""The virtio-mmio transport of every device kind the builder wires (taken from a
surface-mode machine, so a new device kind is fuzzed here without touching this file):
register reads and writes, the status state machine, queue setup and activation."""

from __future__ import annotations

from typing import Any

from fuzz import traffic
from fuzz.data import Data
from isovisor.devices.virtio import constants as vc
from isovisor.security.surface.guest import transport_registers

COVERS = ("mmio:virtio-*",)
_machine: Any = None
_regs: list[int] = []
VALUES = (0, 1, 2, 3, 4, 7, 0xB, 0xF, 0x40, 0x80, 0xFF, 256, 0xFFFF_FFFF)


def setup() -> None:
    global _machine, _regs
    from isovisor.security.surface.machine import build_surface_machine

    _machine = build_surface_machine()
    _regs = [int(v, 16) for v in transport_registers().values()]


def _offset(d: Data, length: int) -> int:
    sel = d.u8()
    if sel < 0xC0:
        return _regs[sel % len(_regs)]
    if sel < 0xF0:
        return vc.MMIO_CONFIG + d.u8() % 0x80
    return d.u16() % (length + 4)


def one_input(data: bytes) -> None:
    if _machine is None:
        setup()
    transports = _machine.machine.virtio
    d = Data(data)
    t = transports[d.u8() % len(transports)]
    try:
        # Values matter more than widths here: mostly aligned 32-bit writes of useful values.
        class Biased:
            def read(self, offset: int, size: int) -> bytes:
                return bytes(t.read(offset, size))

            def write(self, offset: int, raw: bytes) -> None:
                if len(raw) == 4 and raw[0] & 1:
                    raw = (VALUES[raw[1] % len(VALUES)] if raw[2] & 1 else
                           int.from_bytes(raw, "little") % 0x100_0000).to_bytes(4, "little")
                t.write(offset, raw)

        traffic.run(d, [(Biased(), vc.MMIO_WINDOW_SIZE)], offsets=_offset)
        status = t.status
        assert status & ~0xCF == 0, f"status {status:#x} has undefined bits"
    finally:
        t.reset()
