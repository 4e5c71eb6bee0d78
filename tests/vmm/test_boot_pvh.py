"""PVH boot: hvm_start_info v1, memmap, modlist, command line and initrd in guest memory."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from isovisor.memory import GuestMemory
from isovisor.memory.layout import GiB
from isovisor.vmm.boot.e820 import E820Type, e820_map
from isovisor.vmm.boot.errors import BootConfigError, BootImageError
from isovisor.vmm.boot.loader import load_kernel
from tests.vmm.boot_images import MB, Seg, build_bzimage, build_elf, note, pattern, pvh_note

MEM = 32 * MB
START_INFO = 0x6000
MEMMAP = 0x6100
MODLIST = 0x6800
CMDLINE = 0x2_0000
CMDLINE_MAX = 0x1_0000
CODE = pattern(0x400)
START_INFO_FMT = struct.Struct("<IIIIQQQQII")  # start_info.h, 56 bytes
MEMMAP_FMT = struct.Struct("<QQII")
MODLIST_FMT = struct.Struct("<QQQQ")

# The e820 map of 32 MiB of RAM: RAM below the EBDA, the legacy area reserved, RAM from 1 MiB.
E820_32M = [
    (0, 0x9_FC00, 1),
    (0x9_FC00, 0x10_0000 - 0x9_FC00, 2),
    (0x10_0000, MEM - 0x10_0000, 1),
]


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(MEM) as m:
        yield m


def pvh32(entry: int = MB + 0x10, *, bss: int = 0x2000) -> bytes:
    return build_elf([Seg(MB, CODE, bss)], entry=0, bits=32, notes=pvh_note(entry))


def start_info(mem: GuestMemory) -> tuple[int, ...]:
    return START_INFO_FMT.unpack(mem.read_exact(START_INFO, START_INFO_FMT.size))


def memmap(mem: GuestMemory, count: int) -> list[tuple[int, int, int]]:
    raw = mem.read_exact(MEMMAP, count * MEMMAP_FMT.size)
    entries = [MEMMAP_FMT.unpack_from(raw, i * MEMMAP_FMT.size) for i in range(count)]
    assert all(e[3] == 0 for e in entries)  # reserved
    return [e[:3] for e in entries]


def test_pvh_elf32_start_info(mem: GuestMemory) -> None:
    boot = load_kernel(mem, pvh32(), cmdline="console=ttyS0 panic=-1")
    assert boot.protocol == "pvh"
    assert boot.entry == MB + 0x10
    assert boot.boot_struct == START_INFO
    assert (boot.kernel_start, boot.kernel_end, boot.initrd) == (MB, MB + 0x2000, None)
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, mmap, entries, reserved = start_info(
        mem
    )
    assert (magic, version, flags) == (0x336EC578, 1, 0)
    assert (nr_modules, modlist) == (0, 0)
    assert (cmdline, rsdp, mmap, entries, reserved) == (CMDLINE, 0, MEMMAP, 3, 0)
    assert memmap(mem, 3) == E820_32M
    assert mem.read_exact(CMDLINE, 24) == b"console=ttyS0 panic=-1\0\0"
    assert mem.read_exact(MB, len(CODE)) == CODE


def test_pvh_elf64_with_eight_byte_note_and_rsdp(mem: GuestMemory) -> None:
    img = build_elf([Seg(0x180_0000, CODE)], entry=0x180_0000, notes=pvh_note(0x180_0100, 8))
    boot = load_kernel(mem, img, acpi_rsdp=0xE_0000)
    assert (boot.protocol, boot.entry) == ("pvh", 0x180_0100)
    assert start_info(mem)[6] == 0xE_0000
    assert mem.read_exact(CMDLINE, 1) == b"\0"  # an empty command line is just the NUL


def test_pvh_note_among_other_notes(mem: GuestMemory) -> None:
    notes = note(b"GNU", 3, b"\x11" * 20) + note(b"Xen", 5, b"xen-3.0\0") + pvh_note(MB + 4)
    img = build_elf([Seg(MB, CODE)], entry=0, bits=32, notes=notes)
    assert load_kernel(mem, img).entry == MB + 4


def test_initrd_module_placement(mem: GuestMemory) -> None:
    initrd = pattern(0x1_2345, seed=9)
    boot = load_kernel(mem, pvh32(), initrd=initrd)
    addr = (MEM - len(initrd)) & ~0xFFF  # highest page-aligned address below the end of RAM
    assert boot.initrd == (addr, len(initrd))
    assert mem.read_exact(addr, len(initrd)) == initrd
    info = start_info(mem)
    assert (info[3], info[4]) == (1, MODLIST)
    assert MODLIST_FMT.unpack(mem.read_exact(MODLIST, 32)) == (addr, len(initrd), 0, 0)


def test_initrd_fills_ram_up_to_the_kernel(mem: GuestMemory) -> None:
    kernel_end = MB + 0x2000
    fits = bytes(MEM - kernel_end)
    assert load_kernel(mem, pvh32(), initrd=fits).initrd == (kernel_end, len(fits))


def test_initrd_too_big(mem: GuestMemory) -> None:
    too_big = bytes(MEM - MB - 0x2000 + 1)
    with pytest.raises(
        BootImageError,
        match=r"initrd: 0x1efe001 bytes do not fit between the "
        r"kernel's end 0x102000 and 0x2000000",
    ):
        load_kernel(mem, pvh32(), initrd=too_big)
    assert start_info(mem)[0] == 0  # nothing written


def test_empty_initrd_is_an_error(mem: GuestMemory) -> None:
    with pytest.raises(BootImageError, match="initrd: empty"):
        load_kernel(mem, pvh32(), initrd=b"")


def test_cmdline_limits(mem: GuestMemory) -> None:
    longest = "x" * (CMDLINE_MAX - 1)
    load_kernel(mem, pvh32(), cmdline=longest)
    assert mem.read_exact(CMDLINE, CMDLINE_MAX) == longest.encode() + b"\0"
    with pytest.raises(
        BootImageError,
        match=r"command line: 65536 bytes is longer than the "
        r"limit of 65535 bytes",
    ):
        load_kernel(mem, pvh32(), cmdline=longest + "y")
    with pytest.raises(BootImageError, match="contains a NUL"):
        load_kernel(mem, pvh32(), cmdline="a\0b")
    with pytest.raises(BootImageError, match="UTF-8"):
        load_kernel(mem, pvh32(), cmdline="\udcff")


def test_utf8_cmdline_counts_bytes(mem: GuestMemory) -> None:
    load_kernel(mem, pvh32(), cmdline="é")
    assert mem.read_exact(CMDLINE, 3) == b"\xc3\xa9\0"


def test_protocol_pvh_without_note(mem: GuestMemory) -> None:
    img = build_elf([Seg(MB, CODE)], entry=MB)
    with pytest.raises(BootImageError, match=r"no PVH entry point \(ELF note 'Xen' type 18"):
        load_kernel(mem, img, protocol="pvh")


def test_protocol_pvh_on_bzimage(mem: GuestMemory) -> None:
    with pytest.raises(BootImageError, match="bzImage has no PVH entry"):
        load_kernel(mem, build_bzimage(CODE), protocol="pvh")


def test_elf32_without_note_in_auto_mode(mem: GuestMemory) -> None:
    img = build_elf([Seg(MB, CODE)], entry=MB, bits=32)
    with pytest.raises(BootImageError, match="ELF32 without a PVH entry note"):
        load_kernel(mem, img)


@pytest.mark.parametrize(
    ("notes", "message"),
    [
        (pvh_note(MB, 8)[:-8] + (1 << 32).to_bytes(8, "little"), "PVH entry 0x100000000 is above"),
        (
            note(b"Xen", 18, b"\0\0\x10"),
            "PVH entry note in program header 1 has 3 bytes of address",
        ),
        (pvh_note(MB) + pvh_note(MB + 4), r"two different PVH entry notes \(0x100000 and 0x100004"),
        (pvh_note(MB + len(CODE)), "PVH entry 0x100400 is not in a loaded segment"),
        (pvh_note(0x1000), "PVH entry 0x1000 is not in a loaded segment"),
    ],
)
def test_bad_pvh_entries(mem: GuestMemory, notes: bytes, message: str) -> None:
    img = build_elf([Seg(MB, CODE, 0x1000)], entry=0, bits=32, notes=notes)
    with pytest.raises(BootImageError, match="kernel image: " + message):
        load_kernel(mem, img)


def test_same_pvh_note_twice_is_fine(mem: GuestMemory) -> None:
    img = build_elf([Seg(MB, CODE)], entry=0, bits=32, notes=pvh_note(MB) + pvh_note(MB))
    assert load_kernel(mem, img).entry == MB


def test_bad_arguments(mem: GuestMemory) -> None:
    with pytest.raises(BootConfigError, match="unknown boot protocol"):
        load_kernel(mem, pvh32(), protocol="efi")  # type: ignore[arg-type]
    with pytest.raises(BootConfigError, match="RSDP address 0xc0000000 is not in guest RAM"):
        load_kernel(mem, pvh32(), acpi_rsdp=0xC000_0000)


def test_not_a_kernel(mem: GuestMemory) -> None:
    with pytest.raises(BootImageError, match="neither an ELF file"):
        load_kernel(mem, b"\0" * 4096)


def test_e820_above_4g_in_memmap() -> None:
    with GuestMemory(3 * GiB + 512 * MB) as big:
        expected = [
            (0, 0x9_FC00, E820Type.RAM),
            (0x9_FC00, 0x6_0400, E820Type.RESERVED),
            (0x10_0000, 0xC000_0000 - 0x10_0000, E820Type.RAM),
            (0x1_0000_0000, 512 * MB, E820Type.RAM),
        ]
        assert [(e.addr, e.size, e.type) for e in e820_map(big)] == expected
        load_kernel(big, pvh32())
        assert start_info(big)[8] == 4
        assert memmap(big, 4) == [(a, s, int(t)) for a, s, t in expected]
