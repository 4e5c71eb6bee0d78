"""PVH boot: an ELF kernel with a XEN_ELFNOTE_PHYS32_ENTRY note, entered in 32-bit mode.

Xen docs/misc/pvh.pandoc: the kernel is entered at the note's physical address in 32-bit
protected mode, paging off, with EBX holding the address of `hvm_start_info`
(xen/include/public/arch-x86/hvm/start_info.h). We hand it version 1 of that structure:
command line, ACPI RSDP, the e820 memory map and, with an initrd, one module.
"""

from __future__ import annotations

import ctypes
import struct

from isovisor.memory.errors import GuestMemoryError
from isovisor.memory.guest_memory import GuestMemory
from isovisor.memory.layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    PVH_MEMMAP_ADDR,
    PVH_MODLIST_ADDR,
    PVH_START_INFO_ADDR,
)
from isovisor.vmm.boot.e820 import e820_map, low_ram_end
from isovisor.vmm.boot.elf import ElfImage
from isovisor.vmm.boot.errors import BootConfigError, BootImageError
from isovisor.vmm.boot.plan import (
    BootEntry,
    check_kernel_chunks,
    elf_chunks,
    encode_cmdline,
    entry_is_loaded,
    place_initrd,
    write_chunks,
    write_cmdline,
    write_initrd,
)
from isovisor.vmm.boot.start_info import (
    HVM_START_INFO_VERSION,
    HVM_START_MAGIC_VALUE,
    hvm_memmap_table_entry,
    hvm_modlist_entry,
    hvm_start_info,
)

XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18  # xen/include/public/elfnote.h
PHYS32_LIMIT = 1 << 32  # the entry runs in 32-bit protected mode without paging

# Room for our tables in the low boot area (layout.py): memmap up to the modlist, modlist up
# to the zero page.
MAX_MEMMAP_ENTRIES = (PVH_MODLIST_ADDR - PVH_MEMMAP_ADDR) // ctypes.sizeof(hvm_memmap_table_entry)
if PVH_START_INFO_ADDR + ctypes.sizeof(hvm_start_info) > PVH_MEMMAP_ADDR:  # pragma: no cover
    raise ImportError("hvm_start_info overlaps the PVH memmap in layout.py")


def pvh_entry(elf: ElfImage) -> int | None:
    """The PHYS32_ENTRY note's address, or None when the image has none."""
    found: int | None = None
    for note in elf.notes:
        if note.name != XEN_NOTE_NAME or note.type != XEN_ELFNOTE_PHYS32_ENTRY:
            continue
        # The note holds a 32-bit or 64-bit (Linux: _ASM_PTR) little-endian address.
        if len(note.desc) == 4:
            (value,) = struct.unpack("<I", note.desc)
        elif len(note.desc) == 8:
            (value,) = struct.unpack("<Q", note.desc)
        else:
            raise BootImageError(
                f"kernel image: PVH entry note in program header {note.phdr_index} has "
                f"{len(note.desc)} bytes of address (4 or 8 expected)"
            )
        if found is not None and value != found:
            raise BootImageError(
                f"kernel image: two different PVH entry notes ({found:#x} and {value:#x})"
            )
        found = value
    return found


def load_pvh(
    mem: GuestMemory,
    elf: ElfImage,
    data: memoryview,
    *,
    cmdline: str,
    initrd: bytes | None,
    acpi_rsdp: int | None,
) -> BootEntry:
    entry = pvh_entry(elf)
    if entry is None:
        raise BootImageError(
            "kernel image: no PVH entry point (ELF note 'Xen' type 18, XEN_ELFNOTE_PHYS32_ENTRY)"
        )
    if entry >= PHYS32_LIMIT:
        raise BootImageError(f"kernel image: PVH entry {entry:#x} is above 4 GiB")
    chunks = elf_chunks(elf, data)
    check_kernel_chunks(mem, chunks)
    if not entry_is_loaded(chunks, entry):
        raise BootImageError(f"kernel image: PVH entry {entry:#x} is not in a loaded segment")
    kernel_start = min(c.addr for c in chunks)
    kernel_end = max(c.end for c in chunks)
    raw_cmdline = encode_cmdline(cmdline, CMDLINE_MAX - 1, "isovisor's command line buffer")

    low_end = low_ram_end(mem)
    initrd_at: tuple[int, int] | None = None
    if initrd is not None:
        addr = place_initrd(len(initrd), kernel_end, low_end, "end of RAM below 4 GiB")
        initrd_at = (addr, len(initrd))

    memmap = e820_map(mem)
    if len(memmap) > MAX_MEMMAP_ENTRIES:  # pragma: no cover - we make at most 4
        raise BootConfigError(f"{len(memmap)} memory map entries (room for {MAX_MEMMAP_ENTRIES})")
    table = (hvm_memmap_table_entry * len(memmap))(
        *(hvm_memmap_table_entry(e.addr, e.size, int(e.type), 0) for e in memmap)
    )
    info = hvm_start_info(
        magic=HVM_START_MAGIC_VALUE,
        version=HVM_START_INFO_VERSION,
        cmdline_paddr=CMDLINE_ADDR,
        rsdp_paddr=acpi_rsdp or 0,
        memmap_paddr=PVH_MEMMAP_ADDR,
        memmap_entries=len(memmap),
    )

    # Everything is checked: write.
    write_chunks(mem, chunks)
    write_cmdline(mem, raw_cmdline)
    try:
        mem.write_all(PVH_MEMMAP_ADDR, bytes(table))
        if initrd is not None and initrd_at is not None:
            write_initrd(mem, initrd_at[0], initrd)
            info.nr_modules = 1
            info.modlist_paddr = PVH_MODLIST_ADDR
            mem.write_obj(PVH_MODLIST_ADDR, hvm_modlist_entry(initrd_at[0], initrd_at[1], 0, 0))
        mem.write_obj(PVH_START_INFO_ADDR, info)
    except GuestMemoryError as exc:  # pragma: no cover - fixed low-RAM addresses
        raise BootImageError(f"PVH boot structures cannot be written: {exc}") from exc
    return BootEntry("pvh", entry, PVH_START_INFO_ADDR, kernel_start, kernel_end, initrd_at)
