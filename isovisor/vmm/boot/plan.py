"""The load plan shared by every protocol: what goes where, checked before anything is written.

A loader parses the image into `Chunk`s (bytes plus zero fill at a guest-physical address),
checks them all with `check_kernel_chunks`, places the command line and initrd, and only
then writes. So a rejected image leaves guest RAM untouched, and every write that does
happen goes through GuestMemory's own bounds checks as well.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from isovisor.memory.errors import GuestMemoryError
from isovisor.memory.guest_memory import GuestMemory
from isovisor.memory.layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    HIGH_MEMORY_START,
    MMIO_HOLE_END,
    MMIO_HOLE_START,
    PAGE_SIZE,
)
from isovisor.vmm.boot.elf import ElfImage
from isovisor.vmm.boot.errors import BootImageError

ADDRESS_LIMIT = 1 << 64  # guest-physical addresses are 64-bit: a range may not wrap past it
INITRD_ALIGN = PAGE_SIZE  # boot.rst: the initrd should be page-aligned


@dataclass(frozen=True)
class BootEntry:
    """Where and how to start the loaded kernel."""

    protocol: Literal["pvh", "linux64"]
    entry: int  # guest-physical entry point
    # PVH: hvm_start_info address (goes in EBX); linux64: boot_params address (goes in RSI)
    boot_struct: int
    kernel_start: int
    kernel_end: int
    initrd: tuple[int, int] | None  # (addr, size)


@dataclass(frozen=True)
class Chunk:
    """`data` to copy to guest-physical `addr`, then zeros up to `size` bytes (bss)."""

    what: str  # names it in errors: "program header 2", "bzImage protected-mode code"
    addr: int
    data: memoryview
    size: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align


def _where(mem: GuestMemory, addr: int, size: int) -> str:
    """Why [addr, addr+size) is not RAM, as a phrase."""
    end = addr + size
    if addr < MMIO_HOLE_END and end > MMIO_HOLE_START:
        return f"overlaps the MMIO hole [{MMIO_HOLE_START:#x}, {MMIO_HOLE_END:#x})"
    ram_end = max(r.end for r in mem.regions)
    return f"lies outside guest RAM (RAM ends at {ram_end:#x})"


def check_kernel_chunks(mem: GuestMemory, chunks: Sequence[Chunk]) -> None:
    """Each chunk lies wholly in RAM at or above 1 MiB; no two overlap."""
    if not chunks:
        raise BootImageError("kernel image: nothing to load (no non-empty loadable segment)")
    for c in chunks:
        if len(c.data) > c.size:
            raise BootImageError(
                f"kernel image: {c.what} has more file bytes than memory bytes "
                f"({len(c.data):#x} > {c.size:#x})"
            )
        if c.end > ADDRESS_LIMIT:
            raise BootImageError(
                f"kernel image: {c.what} at {c.addr:#x} + {c.size:#x} wraps past the top of "
                "the 64-bit address space"
            )
        # Everything below 1 MiB belongs to us: GDT, page tables, zero page, command line,
        # start_info, ACPI tables, and the reserved legacy area.
        if c.addr < HIGH_MEMORY_START:
            raise BootImageError(
                f"kernel image: {c.what} at {c.addr:#x} lies below 1 MiB, where the boot "
                "structures live"
            )
        if not mem.is_ram(c.addr, c.size):
            raise BootImageError(
                f"kernel image: {c.what} at {c.addr:#x} + {c.size:#x} {_where(mem, c.addr, c.size)}"
            )
    ordered = sorted(chunks, key=lambda c: c.addr)
    for prev, cur in itertools.pairwise(ordered):
        if cur.addr < prev.end:
            raise BootImageError(
                f"kernel image: {cur.what} at {cur.addr:#x} overlaps {prev.what} "
                f"[{prev.addr:#x}, {prev.end:#x})"
            )


def write_chunks(mem: GuestMemory, chunks: Iterable[Chunk]) -> None:
    """Copy checked chunks into guest RAM, zero-filling each one's tail."""
    for c in chunks:
        try:
            mem.write_all(c.addr, c.data)
            mem.fill(c.addr + len(c.data), c.size - len(c.data), 0)
        except GuestMemoryError as exc:  # pragma: no cover - check_kernel_chunks ran first
            raise BootImageError(f"kernel image: {c.what} cannot be written: {exc}") from exc


def encode_cmdline(cmdline: str, limit: int, limit_name: str) -> bytes:
    """The command line as NUL-terminated bytes of at most `limit` characters plus the NUL."""
    if "\0" in cmdline:
        raise BootImageError("command line: contains a NUL character")
    try:
        raw = cmdline.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BootImageError(f"command line: cannot be encoded as UTF-8 ({exc.reason})") from exc
    limit = min(limit, CMDLINE_MAX - 1)  # our buffer at CMDLINE_ADDR holds CMDLINE_MAX bytes
    if len(raw) > limit:
        raise BootImageError(
            f"command line: {len(raw)} bytes is longer than the limit of {limit} bytes "
            f"({limit_name})"
        )
    return raw + b"\0"


def write_cmdline(mem: GuestMemory, raw: bytes) -> None:
    try:
        mem.write_all(CMDLINE_ADDR, raw)
    except GuestMemoryError as exc:  # pragma: no cover - CMDLINE_ADDR is low RAM
        raise BootImageError(f"command line cannot be written: {exc}") from exc


def place_initrd(size: int, kernel_end: int, limit_end: int, limit_name: str) -> int:
    """Highest page-aligned address for `size` bytes ending by `limit_end`, above the kernel."""
    if size == 0:
        raise BootImageError("initrd: empty (pass None for no initrd)")
    lowest = align_up(kernel_end, INITRD_ALIGN)
    addr = align_down(limit_end - size, INITRD_ALIGN)
    if addr < lowest:
        raise BootImageError(
            f"initrd: {size:#x} bytes do not fit between the kernel's end {lowest:#x} and "
            f"{limit_end:#x} ({limit_name})"
        )
    return addr


def write_initrd(mem: GuestMemory, addr: int, initrd: bytes) -> None:
    try:
        mem.write_all(addr, initrd)
    except GuestMemoryError as exc:  # pragma: no cover - place_initrd kept it in low RAM
        raise BootImageError(f"initrd at {addr:#x} cannot be written: {exc}") from exc


def entry_is_loaded(chunks: Sequence[Chunk], entry: int) -> bool:
    """True when `entry` falls in the file-backed bytes of some chunk (code, not bss)."""
    return any(c.addr <= entry < c.addr + len(c.data) for c in chunks)


def elf_chunks(elf: ElfImage, data: memoryview) -> list[Chunk]:
    """One chunk per non-empty PT_LOAD, at its physical address (p_paddr)."""
    return [
        Chunk(f"program header {p.index}", p.paddr, data[p.offset : p.offset + p.filesz], p.memsz)
        for p in elf.loads
    ]
