"""ctypes mirrors of the PVH boot structures (Xen xen/include/public/arch-x86/hvm/start_info.h).

The loader writes these into guest RAM for a PVH kernel; EBX holds the address of
`hvm_start_info` at entry (Xen docs/misc/pvh.pandoc). Layouts are checked at import.
"""

from __future__ import annotations

import ctypes

u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

HVM_START_MAGIC_VALUE = 0x336EC578  # start_info.h: "magic" field value
HVM_START_INFO_VERSION = 1  # version 1 adds memmap_paddr/memmap_entries


class hvm_start_info(ctypes.Structure):
    _fields_ = [
        ("magic", u32),
        ("version", u32),
        ("flags", u32),  # SIF_xxx; none apply to an unprivileged HVM guest
        ("nr_modules", u32),
        ("modlist_paddr", u64),
        ("cmdline_paddr", u64),
        ("rsdp_paddr", u64),
        # version 1 and later:
        ("memmap_paddr", u64),
        ("memmap_entries", u32),
        ("reserved", u32),  # must be zero
    ]


class hvm_modlist_entry(ctypes.Structure):
    _fields_ = [
        ("paddr", u64),
        ("size", u64),
        ("cmdline_paddr", u64),
        ("reserved", u64),
    ]


class hvm_memmap_table_entry(ctypes.Structure):
    _fields_ = [
        ("addr", u64),
        ("size", u64),
        ("type", u32),  # E820 type values (start_info.h XEN_HVM_MEMMAP_TYPE_*)
        ("reserved", u32),  # must be zero for version 1
    ]


_SIZES: tuple[tuple[type[ctypes.Structure], int], ...] = (
    (hvm_start_info, 56),
    (hvm_modlist_entry, 32),
    (hvm_memmap_table_entry, 24),
)
for _cls, _size in _SIZES:
    if ctypes.sizeof(_cls) != _size:  # pragma: no cover - a layout bug, not a runtime state
        raise ImportError(
            f"{_cls.__name__} is {ctypes.sizeof(_cls)} bytes, start_info.h says {_size}"
        )
