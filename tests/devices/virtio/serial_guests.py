"""The guest drivers (guests/*_driver.asm) built to report on COM1 (-DSERIAL) and wrapped
as PVH kernels, so they run through `isovisor run` and the daemon: jailed workers, where
no report port exists."""

from __future__ import annotations

from pathlib import Path

from isovisor.worker.pvh_image import pvh_elf
from tests.devices.virtio.driver_guests import assemble


def build_serial_guest(tmp_path: Path, driver: str, *defines: str) -> Path:
    """guests/<driver>.asm as a PVH kernel reporting 8 hex digits a line on COM1."""
    flat = assemble(tmp_path / f"{driver}.bin", driver, "SERIAL", *defines)
    elf = tmp_path / f"{driver}.elf"
    elf.write_bytes(pvh_elf(flat.read_bytes()))
    return elf


def reported(text: str) -> list[int]:
    """The values a serial guest reported (its 8-hex-digit lines)."""
    return [int(word, 16) for word in text.split() if len(word) == 8]
