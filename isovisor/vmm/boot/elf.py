"""ELF32/ELF64 parsing for kernel images: file header, program headers, notes.

Sans-IO: takes the image bytes, returns immutable objects, raises BootImageError for
anything malformed. Only what booting needs is parsed (System V gABI, "ELF Header",
"Program Header", "Note Section"); section headers are never read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from isovisor.vmm.boot.errors import BootImageError

ELF_MAGIC = b"\x7fELF"
EI_NIDENT = 16
EI_CLASS, EI_DATA, EI_VERSION = 4, 5, 6
ELFDATA2LSB = 1  # x86 is little-endian
EV_CURRENT = 1
ET_EXEC = 2  # kernels are linked at fixed physical addresses
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF  # e_phnum escape to a section-header count: never needed by a kernel

# A kernel has a handful of program headers (vmlinux: 5); refuse absurd counts outright.
MAX_PHDRS = 64
# Notes per PT_NOTE segment we are willing to walk (vmlinux has about ten).
MAX_NOTES = 256


class ElfClass(IntEnum):
    ELF32 = 1
    ELF64 = 2


@dataclass(frozen=True)
class _Layout:
    ehdr: struct.Struct  # e_ident[16] then the rest of the file header
    phdr: struct.Struct
    machine: int


_LAYOUTS = {
    # e_type e_machine e_version e_entry e_phoff e_shoff e_flags e_ehsize e_phentsize e_phnum
    # e_shentsize e_shnum e_shstrndx
    ElfClass.ELF32: _Layout(struct.Struct("<16sHHIIIIIHHHHHH"), struct.Struct("<8I"), EM_386),
    ElfClass.ELF64: _Layout(
        struct.Struct("<16sHHIQQQIHHHHHH"), struct.Struct("<IIQQQQQQ"), EM_X86_64
    ),
}


@dataclass(frozen=True)
class ProgramHeader:
    index: int
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class Note:
    phdr_index: int
    name: bytes  # without the terminating NUL(s)
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    elf_class: ElfClass
    machine: int
    entry: int
    phdrs: tuple[ProgramHeader, ...]
    notes: tuple[Note, ...]

    @property
    def loads(self) -> tuple[ProgramHeader, ...]:
        """PT_LOAD headers with something to load (p_memsz > 0)."""
        return tuple(p for p in self.phdrs if p.type == PT_LOAD and p.memsz > 0)


def is_elf(data: bytes | memoryview) -> bool:
    return bytes(data[:4]) == ELF_MAGIC


def _unpack_phdr(cls: ElfClass, index: int, raw: tuple[int, ...]) -> ProgramHeader:
    if cls is ElfClass.ELF64:
        p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = raw
    else:
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align = raw
    return ProgramHeader(
        index, p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
    )


def parse_elf(data: bytes | memoryview) -> ElfImage:
    """Parse and bounds-check an x86 ELF kernel (ELF32 i386 or ELF64 x86_64)."""
    size = len(data)
    if size < EI_NIDENT or not is_elf(data):
        raise BootImageError("kernel image: not an ELF file (no \\x7fELF magic)")
    try:
        cls = ElfClass(data[EI_CLASS])
    except ValueError:
        raise BootImageError(f"kernel image: unknown ELF class {data[EI_CLASS]}") from None
    if data[EI_DATA] != ELFDATA2LSB:
        raise BootImageError("kernel image: ELF is not little-endian, so not an x86 kernel")
    if data[EI_VERSION] != EV_CURRENT:
        raise BootImageError(f"kernel image: unknown ELF ident version {data[EI_VERSION]}")
    layout = _LAYOUTS[cls]
    if size < layout.ehdr.size:
        raise BootImageError(
            f"kernel image: truncated {cls.name} header ({size} of {layout.ehdr.size} bytes)"
        )
    (_, e_type, e_machine, e_version, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum, *_) = (
        layout.ehdr.unpack_from(data, 0)
    )
    if e_type != ET_EXEC:
        raise BootImageError(f"kernel image: ELF type {e_type} is not an executable (ET_EXEC)")
    if e_machine != layout.machine:
        raise BootImageError(
            f"kernel image: {cls.name} machine {e_machine} is not {layout.machine} "
            f"({'x86_64' if cls is ElfClass.ELF64 else 'i386'})"
        )
    if e_version != EV_CURRENT:
        raise BootImageError(f"kernel image: unknown ELF version {e_version}")
    if e_phentsize != layout.phdr.size:
        raise BootImageError(
            f"kernel image: program header size {e_phentsize} is not {layout.phdr.size}"
        )
    if e_phnum == 0:
        raise BootImageError("kernel image: no program headers")
    if e_phnum > MAX_PHDRS:
        raise BootImageError(f"kernel image: {e_phnum} program headers (at most {MAX_PHDRS})")
    table_end = e_phoff + e_phnum * e_phentsize
    if table_end > size:
        raise BootImageError(
            f"kernel image: program header table extends past the end of the file "
            f"(offset {e_phoff:#x} + {e_phnum} * {e_phentsize} > {size:#x})"
        )
    phdrs = tuple(
        _unpack_phdr(cls, i, layout.phdr.unpack_from(data, e_phoff + i * e_phentsize))
        for i in range(e_phnum)
    )
    for p in phdrs:
        _check_phdr(p, size)
    notes = tuple(n for p in phdrs if p.type == PT_NOTE for n in _parse_notes(data, p))
    return ElfImage(cls, e_machine, e_entry, phdrs, notes)


def _check_phdr(p: ProgramHeader, size: int) -> None:
    if p.type not in (PT_LOAD, PT_NOTE):
        return  # never read: its offsets do not matter
    if p.offset + p.filesz > size:
        raise BootImageError(
            f"kernel image: program header {p.index} extends past the end of the file "
            f"(offset {p.offset:#x} + {p.filesz:#x} > {size:#x})"
        )
    if p.type == PT_LOAD and p.filesz > p.memsz:
        raise BootImageError(
            f"kernel image: program header {p.index} has p_filesz {p.filesz:#x} larger than "
            f"p_memsz {p.memsz:#x}"
        )


_NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type


def _parse_notes(data: bytes | memoryview, p: ProgramHeader) -> list[Note]:
    """Walk one PT_NOTE segment's notes (gABI "Note Section"; 8-byte aligned if p_align is 8)."""
    align = 8 if p.align == 8 else 4
    pos, end = p.offset, p.offset + p.filesz
    notes: list[Note] = []
    while end - pos >= _NOTE_HEADER.size:
        if len(notes) == MAX_NOTES:
            raise BootImageError(
                f"kernel image: program header {p.index} holds more than {MAX_NOTES} notes"
            )
        namesz, descsz, ntype = _NOTE_HEADER.unpack_from(data, pos)
        name_at = pos + _NOTE_HEADER.size
        desc_at = name_at + _align(namesz, align)
        desc_end = desc_at + descsz
        if desc_end > end:
            raise BootImageError(
                f"kernel image: note {len(notes)} in program header {p.index} runs past the "
                f"segment's end (offset {desc_end:#x} > {end:#x})"
            )
        name = bytes(data[name_at : name_at + namesz]).rstrip(b"\0")
        notes.append(Note(p.index, name, ntype, bytes(data[desc_at:desc_end])))
        pos = desc_at + _align(descsz, align)
    return notes


def _align(value: int, align: int) -> int:
    return (value + align - 1) // align * align
