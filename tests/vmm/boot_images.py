"""Builders of small synthetic kernel images for the boot-loader tests.

Written with struct.pack at the offsets of the specs (System V gABI for ELF, Linux
Documentation/arch/x86/boot.rst for bzImage), independently of the loader's own parsers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_LOAD = 1
PT_NOTE = 4
ET_EXEC = 2
EM_386 = 3
EM_X86_64 = 62
XEN_ELFNOTE_PHYS32_ENTRY = 18

EHDR = {32: struct.Struct("<16sHHIIIIIHHHHHH"), 64: struct.Struct("<16sHHIQQQIHHHHHH")}
PHDR = {32: struct.Struct("<8I"), 64: struct.Struct("<IIQQQQQQ")}
MB = 1 << 20


@dataclass(frozen=True)
class Seg:
    paddr: int
    data: bytes
    memsz: int | None = None  # default: len(data)
    p_type: int = PT_LOAD


def pad(data: bytes, align: int) -> bytes:
    return data + b"\0" * (-len(data) % align)


def note(name: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    namez = name + b"\0"
    return struct.pack("<III", len(namez), len(desc), ntype) + pad(namez, align) + pad(desc, align)


def pvh_note(entry: int, size: int = 4) -> bytes:
    return note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, entry.to_bytes(size, "little"))


def phdr_offset(bits: int, index: int) -> int:
    return EHDR[bits].size + index * PHDR[bits].size


def build_elf(
    segs: list[Seg],
    *,
    entry: int,
    bits: int = 64,
    notes: bytes | None = None,
    note_align: int = 4,
    machine: int | None = None,
    e_type: int = ET_EXEC,
) -> bytes:
    """An ELF with one program header per Seg (then a PT_NOTE holding `notes`, if given)."""
    ehdr, phdr = EHDR[bits], PHDR[bits]
    phnum = len(segs) + (notes is not None)
    offset = len(pad(b"\0" * (ehdr.size + phnum * phdr.size), 16))
    body = b""
    phdrs = b""

    def add(blob: bytes) -> int:
        nonlocal body
        at = offset + len(body)
        body += pad(blob, 16)
        return at

    entries = []
    for s in segs:
        at = add(s.data)
        memsz = len(s.data) if s.memsz is None else s.memsz
        entries.append((s.p_type, at, s.paddr, len(s.data), memsz, 7, 16))
    if notes is not None:
        at = add(notes)
        entries.append((PT_NOTE, at, 0, len(notes), len(notes), 4, note_align))
    for p_type, at, paddr, filesz, memsz, flags, align in entries:
        if bits == 64:
            phdrs += phdr.pack(p_type, flags, at, paddr, paddr, filesz, memsz, align)
        else:
            phdrs += phdr.pack(p_type, at, paddr, paddr, filesz, memsz, flags, align)
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + b"\0" * 9
    mach = machine if machine is not None else (EM_X86_64 if bits == 64 else EM_386)
    head = ehdr.pack(
        ident, e_type, mach, 1, entry, ehdr.size, 0, 0, ehdr.size, phdr.size, phnum, 0, 0, 0
    )
    return pad(head + phdrs, 16) + body


def pattern(n: int, seed: int = 1) -> bytes:
    """n recognisable non-zero bytes."""
    return bytes((i * 7 + seed) % 251 + 1 for i in range(n))


# --- bzImage -------------------------------------------------------------------------------

LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02


def build_bzimage(
    pm: bytes,
    *,
    setup_sects: int = 4,
    version: int = 0x020F,
    loadflags: int = LOADED_HIGH,
    xloadflags: int = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
    relocatable: int = 1,
    kernel_alignment: int = 0x20_0000,
    pref_address: int = 0x100_0000,
    init_size: int | None = None,
    initrd_addr_max: int = 0x7FFF_FFFF,
    cmdline_size: int = 0x7FF,
    header_end: int = 0x26C,
    boot_flag: int = 0xAA55,
    syssize: int | None = None,
    magic: bytes = b"HdrS",
) -> bytes:
    """A bzImage: setup sectors with a boot.rst setup header, then `pm` (protected-mode code)."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0:2] = b"MZ"
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, len(pm) // 16 if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FA, 0xFFFF)  # vid_mode "normal"
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    struct.pack_into("<BB", setup, 0x200, 0xEB, header_end - 0x202)
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, loadflags)
    struct.pack_into("<I", setup, 0x214, 0x10_0000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    struct.pack_into("<B", setup, 0x234, relocatable)
    struct.pack_into("<B", setup, 0x235, 21)  # min_alignment
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size if init_size is not None else len(pm) + MB)
    return bytes(setup) + pm
