"""Linux x86 boot protocol, 64-bit entry: bzImage and vmlinux (Documentation/arch/x86/boot.rst).

The guest enters in long mode at the 64-bit entry with RSI pointing at the zero page
(`boot_params`) we build at BOOT_PARAMS_ADDR: for a bzImage, starting from the image's
own setup header ("64-bit BOOT PROTOCOL"); for an ELF64 vmlinux, from scratch.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from isovisor.memory.errors import GuestMemoryError
from isovisor.memory.guest_memory import GuestMemory
from isovisor.memory.layout import (
    BOOT_PARAMS_ADDR,
    CMDLINE_ADDR,
    CMDLINE_MAX,
    HIGH_MEMORY_START,
    GiB,
)
from isovisor.vmm.boot.boot_params import (
    E820_MAX_ENTRIES_ZEROPAGE,
    SETUP_HEADER_OFFSET,
    SETUP_HEADER_ROOM_END,
    ZERO_PAGE_SIZE,
    boot_e820_entry,
    boot_params,
    setup_header,
)
from isovisor.vmm.boot.e820 import e820_map, low_ram_end
from isovisor.vmm.boot.elf import ElfClass, ElfImage
from isovisor.vmm.boot.errors import BootConfigError, BootImageError
from isovisor.vmm.boot.plan import (
    ADDRESS_LIMIT,
    BootEntry,
    Chunk,
    align_up,
    check_kernel_chunks,
    elf_chunks,
    encode_cmdline,
    entry_is_loaded,
    place_initrd,
    write_chunks,
    write_cmdline,
    write_initrd,
)

HDRS_MAGIC = b"HdrS"  # boot.rst: "header" at 0x202
HDRS_OFFSET = 0x202
HDRS_VALUE = int.from_bytes(HDRS_MAGIC, "little")
JUMP_LENGTH_OFFSET = 0x201  # boot.rst 64-bit protocol: header ends at 0x202 + this byte
BOOT_FLAG = 0xAA55  # boot.rst: boot_flag at 0x1fe
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags with XLF_KERNEL_64, the 64-bit entry at +0x200
ZERO_PAGE_PROTOCOL = 0x020F  # the zero-page layout we fill for a vmlinux (boot.rst 2.15)
PROTOCOL_CMDLINE_SIZE = 0x0206  # cmdline_size exists from 2.06 ...
OLD_CMDLINE_LIMIT = 255  # ... before it, 255 characters
PROTOCOL_INITRD_ADDR_MAX = 0x0203  # initrd_addr_max exists from 2.03 ...
OLD_INITRD_ADDR_MAX = 0x37FF_FFFF  # ... before it, this default
# The header must reach through init_size (0x260..0x264) for us to place the kernel.
HEADER_MIN_END = SETUP_HEADER_OFFSET + setup_header.handover_offset.offset

SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # boot.rst: setup_sects 0 means 4
LOADED_HIGH = 0x01  # loadflags: protected-mode code at 0x100000 or above
CAN_USE_HEAP = 0x80  # loadflags: heap_end_ptr is valid
XLF_KERNEL_64 = 0x01  # xloadflags: has the 64-bit entry at load address + 0x200
TYPE_OF_LOADER_UNDEFINED = 0xFF  # boot.rst: loader without an assigned ID
# boot.rst "Sample boot configuration": setup at 0x90000 with its heap ending at 0x9fe00;
# the field is that end minus 0x200. Unused by the 64-bit entry, set as loaders do.
HEAP_END_PTR = 0xFE00
ENTRY_64_OFFSET = 0x200  # boot.rst "64-bit BOOT PROTOCOL"
MAX_KERNEL_ALIGNMENT = 1 * GiB  # sanity bound on the header's kernel_alignment


@dataclass(frozen=True)
class BzImage:
    header: bytes  # image bytes [0x1f1, header end): copied into the zero page
    hdr: setup_header
    pm_offset: int  # file offset of the protected-mode code
    pm_size: int

    @property
    def memory_needed(self) -> int:
        """Bytes from the load address the kernel needs (boot.rst init_size, 2.10+)."""
        return max(self.pm_size, int(self.hdr.init_size))

    @property
    def relocatable(self) -> bool:
        return bool(self.hdr.relocatable_kernel)


def is_bzimage(data: bytes | memoryview) -> bool:
    return bytes(data[HDRS_OFFSET : HDRS_OFFSET + 4]) == HDRS_MAGIC


def cmdline_limit(hdr: setup_header) -> int:
    """Longest command line, without the NUL, the kernel accepts (boot.rst cmdline_size)."""
    return int(hdr.cmdline_size) if hdr.version >= PROTOCOL_CMDLINE_SIZE else OLD_CMDLINE_LIMIT


def initrd_addr_max(hdr: setup_header) -> int:
    """Highest address the initrd may occupy (boot.rst initrd_addr_max, inclusive)."""
    if hdr.version >= PROTOCOL_INITRD_ADDR_MAX:
        return int(hdr.initrd_addr_max)
    return OLD_INITRD_ADDR_MAX


def _version(v: int) -> str:
    return f"{v >> 8}.{v & 0xFF:02d}"


def parse_bzimage(data: bytes | memoryview) -> BzImage:
    """Check a bzImage's setup header for everything the 64-bit entry needs."""
    size = len(data)
    if size < HDRS_OFFSET + 4 or not is_bzimage(data):
        raise BootImageError("kernel image: not a bzImage (no 'HdrS' magic at 0x202)")
    header_end = HDRS_OFFSET + data[JUMP_LENGTH_OFFSET]
    if not HEADER_MIN_END <= header_end <= SETUP_HEADER_ROOM_END:
        raise BootImageError(
            f"kernel image: setup header ends at {header_end:#x} (0x202 + byte at 0x201); "
            f"the 64-bit entry needs it between {HEADER_MIN_END:#x} and {SETUP_HEADER_ROOM_END:#x}"
        )
    if header_end > size:
        raise BootImageError(
            f"kernel image: setup header ends at {header_end:#x}, past the end of the file "
            f"({size:#x})"
        )
    header = bytes(data[SETUP_HEADER_OFFSET:header_end])
    padded = header[: ctypes.sizeof(setup_header)].ljust(ctypes.sizeof(setup_header), b"\0")
    hdr = setup_header.from_buffer_copy(padded)
    if hdr.boot_flag != BOOT_FLAG:
        raise BootImageError(
            f"kernel image: boot_flag at 0x1fe is {hdr.boot_flag:#06x}, not 0xaa55"
        )
    if hdr.version < MIN_PROTOCOL:
        raise BootImageError(
            f"kernel image: boot protocol {_version(hdr.version)} is too old: the 64-bit "
            f"entry needs {_version(MIN_PROTOCOL)} or later"
        )
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootImageError("kernel image: not 64-bit capable (xloadflags lacks XLF_KERNEL_64)")
    if not hdr.loadflags & LOADED_HIGH:
        raise BootImageError("kernel image: a zImage (loadflags lacks LOADED_HIGH); not supported")
    pm_offset = ((hdr.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE
    if pm_offset >= size:
        raise BootImageError(
            f"kernel image: no protected-mode code after the {pm_offset:#x} bytes of setup "
            f"(file is {size:#x} bytes)"
        )
    pm_size = size - pm_offset
    if hdr.syssize * 16 > pm_size:  # boot.rst: syssize counts 16-byte paragraphs
        raise BootImageError(
            f"kernel image: truncated: syssize says {hdr.syssize * 16:#x} bytes of "
            f"protected-mode code, the file has {pm_size:#x}"
        )
    if hdr.relocatable_kernel:
        align = hdr.kernel_alignment
        if align == 0 or align & (align - 1) or align > MAX_KERNEL_ALIGNMENT:
            raise BootImageError(
                f"kernel image: kernel_alignment {align:#x} is not a power of two up to "
                f"{MAX_KERNEL_ALIGNMENT:#x}"
            )
    return BzImage(header, hdr, pm_offset, pm_size)


def _load_address(mem: GuestMemory, bz: BzImage) -> int:
    """pref_address when it is usable, else 1 MiB rounded up to kernel_alignment (boot.rst)."""
    need = bz.memory_needed
    pref = int(bz.hdr.pref_address)
    pref_ok = (
        pref >= HIGH_MEMORY_START
        and pref + need <= ADDRESS_LIMIT
        and mem.is_ram(pref, need)
        and (not bz.relocatable or pref % bz.hdr.kernel_alignment == 0)
    )
    if pref_ok:
        return pref
    if bz.relocatable:
        return align_up(HIGH_MEMORY_START, int(bz.hdr.kernel_alignment))
    raise BootImageError(
        f"kernel image: not relocatable, and its preferred address {pref:#x} + {need:#x} "
        "is not in guest RAM"
    )


def _fill_zero_page(
    mem: GuestMemory,
    params: boot_params,
    initrd_at: tuple[int, int] | None,
    acpi_rsdp: int | None,
) -> None:
    """The fields a boot loader writes (boot.rst "Details of header fields", zero-page.rst)."""
    hdr = params.hdr
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.loadflags = LOADED_HIGH | CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.cmd_line_ptr = CMDLINE_ADDR & 0xFFFF_FFFF
    params.ext_cmd_line_ptr = CMDLINE_ADDR >> 32
    hdr.setup_data = 0  # we pass no setup_data list; never follow the image's pointer
    if initrd_at is not None:
        addr, size = initrd_at
        hdr.ramdisk_image, params.ext_ramdisk_image = addr & 0xFFFF_FFFF, addr >> 32
        hdr.ramdisk_size, params.ext_ramdisk_size = size & 0xFFFF_FFFF, size >> 32
    memmap = e820_map(mem)
    if len(memmap) > E820_MAX_ENTRIES_ZEROPAGE:  # pragma: no cover - we make at most 4
        raise BootConfigError(f"{len(memmap)} e820 entries (the zero page holds 128)")
    for i, e in enumerate(memmap):
        params.e820_table[i] = boot_e820_entry(e.addr, e.size, int(e.type))
    params.e820_entries = len(memmap)
    if acpi_rsdp is not None:
        params.acpi_rsdp_addr = acpi_rsdp  # zero-page.rst 0x070, protocol 2.14


def _write_zero_page(mem: GuestMemory, params: boot_params) -> None:
    try:
        mem.write_obj(BOOT_PARAMS_ADDR, params)
    except GuestMemoryError as exc:  # pragma: no cover - fixed low-RAM address
        raise BootImageError(f"zero page cannot be written: {exc}") from exc


def _initrd(
    initrd: bytes | None, kernel_end: int, limit_end: int, limit_name: str
) -> tuple[int, int] | None:
    if initrd is None:
        return None
    return place_initrd(len(initrd), kernel_end, limit_end, limit_name), len(initrd)


def _write_all(
    mem: GuestMemory,
    chunks: list[Chunk],
    raw_cmdline: bytes,
    initrd: bytes | None,
    initrd_at: tuple[int, int] | None,
    params: boot_params,
) -> None:
    write_chunks(mem, chunks)
    write_cmdline(mem, raw_cmdline)
    if initrd is not None and initrd_at is not None:
        write_initrd(mem, initrd_at[0], initrd)
    _write_zero_page(mem, params)


def load_bzimage(
    mem: GuestMemory,
    data: memoryview,
    *,
    cmdline: str,
    initrd: bytes | None,
    acpi_rsdp: int | None,
) -> BootEntry:
    bz = parse_bzimage(data)
    load = _load_address(mem, bz)
    chunks = [Chunk("bzImage protected-mode code", load, data[bz.pm_offset :], bz.memory_needed)]
    check_kernel_chunks(mem, chunks)
    kernel_end = chunks[0].end
    raw_cmdline = encode_cmdline(cmdline, cmdline_limit(bz.hdr), "the kernel's cmdline_size")
    addr_max = initrd_addr_max(bz.hdr)
    low_end = low_ram_end(mem)
    if addr_max + 1 < low_end:
        initrd_at = _initrd(initrd, kernel_end, addr_max + 1, "the kernel's initrd_addr_max")
    else:
        initrd_at = _initrd(initrd, kernel_end, low_end, "end of RAM below 4 GiB")

    # The zero page starts all zero, with the image's setup header copied in (boot.rst).
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(bz.header)] = bz.header
    params = boot_params.from_buffer_copy(page)
    _fill_zero_page(mem, params, initrd_at, acpi_rsdp)

    _write_all(mem, chunks, raw_cmdline, initrd, initrd_at, params)
    return BootEntry(
        "linux64", load + ENTRY_64_OFFSET, BOOT_PARAMS_ADDR, load, kernel_end, initrd_at
    )


def load_vmlinux(
    mem: GuestMemory,
    elf: ElfImage,
    data: memoryview,
    *,
    cmdline: str,
    initrd: bytes | None,
    acpi_rsdp: int | None,
) -> BootEntry:
    """An x86_64 vmlinux: PT_LOADs at p_paddr, entered at e_entry (physical on x86)."""
    if elf.elf_class is not ElfClass.ELF64:
        raise BootImageError(
            "kernel image: the Linux 64-bit boot protocol needs an ELF64 x86_64 vmlinux, "
            "this is ELF32"
        )
    chunks = elf_chunks(elf, data)
    check_kernel_chunks(mem, chunks)
    if not entry_is_loaded(chunks, elf.entry):
        raise BootImageError(f"kernel image: entry point {elf.entry:#x} is not in a loaded segment")
    kernel_start = min(c.addr for c in chunks)
    kernel_end = max(c.end for c in chunks)
    raw_cmdline = encode_cmdline(cmdline, CMDLINE_MAX - 1, "isovisor's command line buffer")
    initrd_at = _initrd(initrd, kernel_end, low_ram_end(mem), "end of RAM below 4 GiB")

    params = boot_params()
    params.hdr.boot_flag = BOOT_FLAG
    params.hdr.header = HDRS_VALUE
    params.hdr.version = ZERO_PAGE_PROTOCOL
    params.hdr.cmdline_size = CMDLINE_MAX - 1
    _fill_zero_page(mem, params, initrd_at, acpi_rsdp)

    _write_all(mem, chunks, raw_cmdline, initrd, initrd_at, params)
    return BootEntry("linux64", elf.entry, BOOT_PARAMS_ADDR, kernel_start, kernel_end, initrd_at)
