"""ELF parsing and segment loading: every header check, and exact guest memory after a load."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from isovisor.memory import GuestMemory
from isovisor.vmm.boot.elf import MAX_NOTES, MAX_PHDRS, ElfClass, parse_elf
from isovisor.vmm.boot.errors import BootImageError
from isovisor.vmm.boot.loader import load_kernel
from tests.vmm.boot_images import (
    EM_386,
    MB,
    PT_NOTE,
    Seg,
    build_elf,
    note,
    pattern,
    phdr_offset,
    pvh_note,
)

MEM = 32 * MB
CODE = pattern(0x300)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(MEM) as m:
        yield m


def vmlinux(*segs: Seg, entry: int = 0x100_0000) -> bytes:
    return build_elf(list(segs) or [Seg(0x100_0000, CODE)], entry=entry)


# --- parsing -------------------------------------------------------------------------------


def test_parse_elf64_headers_and_notes() -> None:
    img = build_elf(
        [Seg(0x100_0000, CODE, 0x1000), Seg(0x120_0000, b"ab", 0x10)],
        entry=0x100_0010,
        notes=note(b"GNU", 3, b"\x01" * 20) + pvh_note(0x100_0040, 8),
    )
    elf = parse_elf(img)
    assert elf.elf_class is ElfClass.ELF64
    assert elf.entry == 0x100_0010
    assert [(p.paddr, p.filesz, p.memsz) for p in elf.loads] == [
        (0x100_0000, len(CODE), 0x1000),
        (0x120_0000, 2, 0x10),
    ]
    assert elf.phdrs[2].type == PT_NOTE
    assert [(n.name, n.type, n.desc) for n in elf.notes] == [
        (b"GNU", 3, b"\x01" * 20),
        (b"Xen", 18, (0x100_0040).to_bytes(8, "little")),
    ]


def test_parse_elf32_and_eight_byte_aligned_notes() -> None:
    notes = note(b"Go", 4, b"xyz", align=8) + note(b"Xen", 18, b"\x00\x00\x10\x00", align=8)
    img = build_elf([Seg(MB, CODE)], entry=MB, bits=32, notes=notes, note_align=8)
    elf = parse_elf(img)
    assert elf.elf_class is ElfClass.ELF32 and elf.machine == EM_386
    assert [(n.name, n.desc) for n in elf.notes] == [(b"Go", b"xyz"), (b"Xen", b"\0\0\x10\0")]


def _patched(img: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(img)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


GOOD = build_elf([Seg(0x100_0000, CODE)], entry=0x100_0000)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"", "not an ELF"),
        (b"\x7fEL", "not an ELF"),
        (b"\x7fELF", "not an ELF"),
        (GOOD[:16], "truncated ELF64 header (16 of 64 bytes)"),
        (GOOD[:63], "truncated ELF64 header"),
        (_patched(GOOD, 4, "<B", 3), "unknown ELF class 3"),
        (_patched(GOOD, 5, "<B", 2), "not little-endian"),
        (_patched(GOOD, 6, "<B", 0), "ident version"),
        (_patched(GOOD, 16, "<H", 3), "ELF type 3 is not an executable"),
        (_patched(GOOD, 18, "<H", EM_386), "machine 3 is not 62"),
        (_patched(GOOD, 20, "<I", 2), "unknown ELF version 2"),
        (_patched(GOOD, 54, "<H", 32), "program header size 32 is not 56"),
        (_patched(GOOD, 56, "<H", 0), "no program headers"),
        (_patched(GOOD, 56, "<H", MAX_PHDRS + 1), f"65 program headers (at most {MAX_PHDRS})"),
        (_patched(GOOD, 56, "<H", 0xFFFF), "65535 program headers"),
        (_patched(GOOD, 32, "<Q", len(GOOD) - 8), "program header table extends past the end"),
        (_patched(GOOD, 32, "<Q", (1 << 64) - 8), "program header table extends past the end"),
    ],
)
def test_header_rejections(image: bytes, message: str) -> None:
    with pytest.raises(
        BootImageError, match="kernel image: .*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        parse_elf(image)


def test_truncated_elf32_header() -> None:
    img = build_elf([Seg(MB, CODE)], entry=MB, bits=32)
    with pytest.raises(BootImageError, match=r"truncated ELF32 header \(40 of 52 bytes\)"):
        parse_elf(img[:40])


def test_phdr_past_eof_names_the_header_and_numbers() -> None:
    img = build_elf([Seg(0x100_0000, CODE), Seg(0x110_0000, CODE)], entry=0x100_0000)
    off = phdr_offset(64, 1)
    file_off = struct.unpack_from("<Q", img, off + 8)[0]
    bad = _patched(img, off + 32, "<Q", len(img))  # p_filesz
    expected = (
        f"kernel image: program header 1 extends past the end of the file "
        f"(offset {file_off:#x} + {len(img):#x} > {len(img):#x})"
    )
    with pytest.raises(BootImageError) as exc:
        parse_elf(bad)
    assert str(exc.value) == expected


def test_phdr_offset_near_2_64_is_past_eof() -> None:
    off = phdr_offset(64, 0)
    with pytest.raises(BootImageError, match="program header 0 extends past the end"):
        parse_elf(_patched(GOOD, off + 8, "<Q", (1 << 64) - 1))


def test_truncated_file_cuts_a_segment() -> None:
    with pytest.raises(BootImageError, match="program header 0 extends past the end"):
        parse_elf(GOOD[:-1])


def test_filesz_larger_than_memsz() -> None:
    img = build_elf([Seg(0x100_0000, CODE, memsz=0x10)], entry=0x100_0000)
    with pytest.raises(
        BootImageError,
        match=r"program header 0 has p_filesz 0x300 larger than "
        r"p_memsz 0x10",
    ):
        parse_elf(img)


def test_unused_phdr_types_are_not_bounds_checked() -> None:
    # A PT_GNU_STACK header (0x6474e551) is never read, so a wild offset there is harmless.
    two = build_elf([Seg(0x100_0000, CODE), Seg(0, b"", 0, p_type=0x6474E551)], entry=0x100_0000)
    wild = _patched(two, phdr_offset(64, 1) + 8, "<Q", 1 << 60)
    assert len(parse_elf(wild).loads) == 1


def test_truncated_note() -> None:
    notes = pvh_note(MB)
    img = build_elf([Seg(MB, CODE)], entry=MB, bits=32, notes=notes)
    # Claim a bigger descriptor than the segment holds.
    note_at = struct.unpack_from("<I", img, phdr_offset(32, 1) + 4)[0]
    bad = _patched(img, note_at + 4, "<I", 0x100)
    with pytest.raises(BootImageError, match="note 0 in program header 1 runs past"):
        parse_elf(bad)
    huge = _patched(img, note_at, "<I", 0xFFFF_FFFF)  # namesz
    with pytest.raises(BootImageError, match="note 0 in program header 1 runs past"):
        parse_elf(huge)


def test_too_many_notes() -> None:
    notes = note(b"A", 1, b"") * (MAX_NOTES + 1)
    img = build_elf([Seg(MB, CODE)], entry=MB, notes=notes)
    with pytest.raises(BootImageError, match=f"more than {MAX_NOTES} notes"):
        parse_elf(img)


# --- loading -------------------------------------------------------------------------------


def test_segments_loaded_at_paddr_and_bss_zeroed(mem: GuestMemory) -> None:
    data = pattern(0x1800, seed=3)
    mem.fill(0x100_0000, 0x40_0000, 0xAA)  # stale bytes the loader must clear
    img = vmlinux(Seg(0x100_0000, CODE, 0x1000), Seg(0x120_0000, data, 0x3000))
    boot = load_kernel(mem, img)
    assert boot.protocol == "linux64"
    assert (boot.kernel_start, boot.kernel_end) == (0x100_0000, 0x120_3000)
    assert mem.read_exact(0x100_0000, len(CODE)) == CODE
    assert mem.read_exact(0x100_0000 + len(CODE), 0x1000 - len(CODE)) == bytes(0x1000 - len(CODE))
    assert mem.read_exact(0x120_0000, len(data)) == data
    assert mem.read_exact(0x120_1800, 0x1800) == bytes(0x1800)
    assert mem.read_u8(0x120_3000) == 0xAA  # nothing past p_memsz
    assert mem.read_u8(0x100_1000) == 0xAA


def test_empty_pt_load_is_ignored(mem: GuestMemory) -> None:
    img = vmlinux(Seg(0x100_0000, CODE), Seg(0x10, b"", 0))
    assert load_kernel(mem, img).kernel_start == 0x100_0000


def test_no_loadable_segment(mem: GuestMemory) -> None:
    img = build_elf([Seg(0x100_0000, b"", 0)], entry=0x100_0000)
    with pytest.raises(BootImageError, match="nothing to load"):
        load_kernel(mem, img)


@pytest.mark.parametrize(
    ("seg", "message"),
    [
        (Seg(0xF_F000, CODE), r"at 0xff000 lies below 1 MiB"),
        (Seg(0x0, CODE), r"at 0x0 lies below 1 MiB"),
        (Seg(0xC000_0000, CODE), r"overlaps the MMIO hole \[0xc0000000, 0x100000000\)"),
        (Seg(0xBFFF_F000, CODE, 0x2000), r"overlaps the MMIO hole"),
        (
            Seg(MEM - 0x100, CODE),
            r"at 0x1ffff00 \+ 0x300 lies outside guest RAM \(RAM ends at "
            r"0x2000000\)",
        ),
        (Seg(0x1_0000_0000, CODE), r"lies outside guest RAM"),
        (Seg(0xFFFF_FFFF_FFFF_F000, CODE, 0x2000), r"wraps past the top of the 64-bit"),
    ],
)
def test_segment_placement_rejections(mem: GuestMemory, seg: Seg, message: str) -> None:
    img = build_elf([Seg(0x100_0000, CODE), seg], entry=0x100_0000)
    with pytest.raises(BootImageError, match="kernel image: program header 1 .*" + message):
        load_kernel(mem, img)


def test_overlapping_segments(mem: GuestMemory) -> None:
    img = vmlinux(Seg(0x100_0000, CODE, 0x2000), Seg(0x100_1000, CODE))
    with pytest.raises(
        BootImageError,
        match=r"program header 1 at 0x1001000 overlaps program "
        r"header 0 \[0x1000000, 0x1002000\)",
    ):
        load_kernel(mem, img)


def test_adjacent_segments_are_fine(mem: GuestMemory) -> None:
    img = vmlinux(Seg(0x100_0000, CODE, 0x1000), Seg(0x100_1000, CODE))
    assert load_kernel(mem, img).kernel_end == 0x100_1000 + len(CODE)


def test_entry_outside_loaded_code(mem: GuestMemory) -> None:
    img = vmlinux(Seg(0x100_0000, CODE, 0x1000), entry=0x100_0000 + len(CODE))  # in bss
    with pytest.raises(BootImageError, match="entry point 0x1000300 is not in a loaded segment"):
        load_kernel(mem, img)


def test_rejected_image_writes_nothing(mem: GuestMemory) -> None:
    img = vmlinux(Seg(0x100_0000, CODE), Seg(0x1FF_FF00, CODE))
    with pytest.raises(BootImageError):
        load_kernel(mem, img)
    assert mem.read_exact(0x100_0000, len(CODE)) == bytes(len(CODE))


def test_elf32_segment_sizes_are_32_bit() -> None:
    img = build_elf([Seg(MB, CODE, 0xFFFF_FFFF)], entry=MB, bits=32)
    assert parse_elf(img).loads[0].memsz == 0xFFFF_FFFF
    with GuestMemory(16 * MB) as m, pytest.raises(BootImageError, match="overlaps the MMIO hole"):
        load_kernel(
            m, build_elf([Seg(MB, CODE, 0xFFFF_FFFF)], entry=MB, bits=32, notes=pvh_note(MB))
        )
