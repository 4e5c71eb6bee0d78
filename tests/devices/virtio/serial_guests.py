"""The guest drivers (guests/*_driver.asm) built to report on COM1 (-DSERIAL) and wrapped
as PVH kernels, so they run through `isovisor run` and the daemon: jailed workers, where
no report port exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from isovisor.worker.pvh_image import pvh_elf

GUESTS = Path(__file__).parent / "guests"


def build_serial_guest(tmp_path: Path, driver: str, *defines: str) -> Path:
    """guests/<driver>.asm as a PVH kernel reporting 8 hex digits a line on COM1."""
    if shutil.which("nasm") is None:
        pytest.fail("nasm is missing: run `make setup` (the Makefile installs it)")
    flat = tmp_path / f"{driver}.bin"
    subprocess.run(["nasm", "-f", "bin", "-DSERIAL", *(f"-D{d}" for d in defines), "-o",
                    str(flat), str(GUESTS / f"{driver}.asm")], check=True)
    elf = tmp_path / f"{driver}.elf"
    elf.write_bytes(pvh_elf(flat.read_bytes()))
    return elf


def reported(text: str) -> list[int]:
    """The values a serial guest reported (its 8-hex-digit lines)."""
    return [int(word, 16) for word in text.split() if len(word) == 8]
