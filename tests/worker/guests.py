"""Build the worker tests' idle guest (also used by bench/worker_memory.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IDLE_SOURCE = REPO / "tests" / "worker" / "idle_guest.asm"


def build_idle_guest(out_dir: Path) -> Path:
    """Assemble and link the idle guest (nasm + ld, like the Makefile's guests rule)."""
    obj = out_dir / "idle.o"
    elf = out_dir / "idle.elf"
    subprocess.run(["nasm", "-f", "elf32", "-I", str(REPO / "guests" / "include") + "/",
                    "-o", str(obj), str(IDLE_SOURCE)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-T", str(REPO / "guests" / "guest.ld"), "-o",
                    str(elf), str(obj)], check=True)
    return elf
