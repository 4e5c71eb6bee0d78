"""Assembling the virtio driver guests (guests/*.asm: blk, net, rng and vsock drivers,
net_tenant) as flat binaries: nasm with the guests' own directory on its include path
(report.inc, serial_report.inc, virtio_mmio.inc) and the given -D defines."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "guests"


def assemble(out: Path, driver: str, *defines: str) -> Path:
    """guests/<driver>.asm assembled to `out` (a flat binary), with -D<d> for each define."""
    if shutil.which("nasm") is None:
        pytest.fail("nasm is missing: run `make setup` (the Makefile installs it)")
    subprocess.run(["nasm", "-f", "bin", "-I", f"{GUESTS}/", *(f"-D{d}" for d in defines),
                    "-o", str(out), str(GUESTS / f"{driver}.asm")], check=True)
    return out
