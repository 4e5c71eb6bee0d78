"""A minimal PVH kernel image: one loadable segment of flat 32-bit code and the Xen
PHYS32_ENTRY note, as an ELF32 executable (what the PVH loader accepts)."""

from __future__ import annotations

import struct

LOAD_ADDR = 0x10_0000
_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")
_PHDR = struct.Struct("<IIIIIIII")
PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
HLT_LOOP = bytes.fromhex("f4ebfd")  # hlt; jmp back to the hlt


def pvh_elf(code: bytes, load_addr: int = LOAD_ADDR) -> bytes:
    """ELF32 i386 ET_EXEC: `code` loaded and entered at `load_addr`."""
    note = struct.pack("<III4sI", 4, 4, XEN_ELFNOTE_PHYS32_ENTRY, b"Xen\0", load_addr)
    phoff = _EHDR.size
    note_off = phoff + 2 * _PHDR.size
    code_off = (note_off + len(note) + 15) & ~15
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr = _EHDR.pack(ident, 2, 3, 1, load_addr, phoff, 0, 0, _EHDR.size, _PHDR.size, 2,
                      0, 0, 0)
    load = _PHDR.pack(PT_LOAD, code_off, load_addr, load_addr, len(code), len(code), 5, 16)
    notes = _PHDR.pack(PT_NOTE, note_off, 0, 0, len(note), len(note), 4, 4)
    head = ehdr + load + notes + note
    return head + bytes(code_off - len(head)) + code
