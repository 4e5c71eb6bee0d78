"""ctypes mirrors of the Linux x86 zero page (`struct boot_params`) and its `setup_header`.

Offsets follow Documentation/arch/x86/zero-page.rst and boot.rst ("THE REAL-MODE KERNEL
HEADER"); both structures are packed. Parts the loader never fills are opaque byte arrays
with their zero-page names. The layout is checked at import.
"""

from __future__ import annotations

import ctypes

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

ZERO_PAGE_SIZE = 4096
SETUP_HEADER_OFFSET = 0x1F1  # boot.rst: the setup header starts at 0x1f1 of the image
E820_MAX_ENTRIES_ZEROPAGE = 128  # zero-page.rst: e820_table is 0xa00 bytes of 20-byte entries


class setup_header(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("setup_sects", u8),  # 0x1f1
        ("root_flags", u16),  # 0x1f2
        ("syssize", u32),  # 0x1f4, protected-mode code size in 16-byte paragraphs
        ("ram_size", u16),  # 0x1f8
        ("vid_mode", u16),  # 0x1fa
        ("root_dev", u16),  # 0x1fc
        ("boot_flag", u16),  # 0x1fe, 0xaa55
        ("jump", u16),  # 0x200, short jump; its second byte sizes the header
        ("header", u32),  # 0x202, "HdrS"
        ("version", u16),  # 0x206
        ("realmode_swtch", u32),  # 0x208
        ("start_sys_seg", u16),  # 0x20c
        ("kernel_version", u16),  # 0x20e
        ("type_of_loader", u8),  # 0x210
        ("loadflags", u8),  # 0x211
        ("setup_move_size", u16),  # 0x212
        ("code32_start", u32),  # 0x214
        ("ramdisk_image", u32),  # 0x218
        ("ramdisk_size", u32),  # 0x21c
        ("bootsect_kludge", u32),  # 0x220
        ("heap_end_ptr", u16),  # 0x224
        ("ext_loader_ver", u8),  # 0x226
        ("ext_loader_type", u8),  # 0x227
        ("cmd_line_ptr", u32),  # 0x228
        ("initrd_addr_max", u32),  # 0x22c
        ("kernel_alignment", u32),  # 0x230
        ("relocatable_kernel", u8),  # 0x234
        ("min_alignment", u8),  # 0x235
        ("xloadflags", u16),  # 0x236
        ("cmdline_size", u32),  # 0x238
        ("hardware_subarch", u32),  # 0x23c
        ("hardware_subarch_data", u64),  # 0x240
        ("payload_offset", u32),  # 0x248
        ("payload_length", u32),  # 0x24c
        ("setup_data", u64),  # 0x250
        ("pref_address", u64),  # 0x258
        ("init_size", u32),  # 0x260
        ("handover_offset", u32),  # 0x264
        ("kernel_info_offset", u32),  # 0x268
    ]


class boot_e820_entry(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("addr", u64), ("size", u64), ("type", u32)]


class boot_params(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("screen_info", u8 * 0x40),  # 0x000
        ("apm_bios_info", u8 * 0x14),  # 0x040
        ("_pad2", u8 * 4),  # 0x054
        ("tboot_addr", u64),  # 0x058
        ("ist_info", u8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", u64),  # 0x070
        ("_pad3", u8 * 8),  # 0x078
        ("hd0_info", u8 * 16),  # 0x080
        ("hd1_info", u8 * 16),  # 0x090
        ("sys_desc_table", u8 * 16),  # 0x0a0
        ("olpc_ofw_header", u8 * 16),  # 0x0b0
        ("ext_ramdisk_image", u32),  # 0x0c0
        ("ext_ramdisk_size", u32),  # 0x0c4
        ("ext_cmd_line_ptr", u32),  # 0x0c8
        ("_pad4", u8 * 112),  # 0x0cc
        ("cc_blob_address", u32),  # 0x13c
        ("edid_info", u8 * 0x80),  # 0x140
        ("efi_info", u8 * 0x20),  # 0x1c0
        ("alt_mem_k", u32),  # 0x1e0
        ("scratch", u32),  # 0x1e4
        ("e820_entries", u8),  # 0x1e8
        ("eddbuf_entries", u8),  # 0x1e9
        ("edd_mbr_sig_buf_entries", u8),  # 0x1ea
        ("kbd_status", u8),  # 0x1eb
        ("secure_boot", u8),  # 0x1ec
        ("_pad5", u8 * 2),  # 0x1ed
        ("sentinel", u8),  # 0x1ef
        ("_pad6", u8 * 1),  # 0x1f0
        ("hdr", setup_header),  # 0x1f1
        ("_pad7", u8 * (0x290 - 0x1F1 - 0x7B)),
        ("edd_mbr_sig_buffer", u32 * 16),  # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", u8 * 48),  # 0xcd0
        ("eddbuf", u8 * (6 * 82)),  # 0xd00
        ("_pad9", u8 * 276),  # 0xeec
    ]


# End of the room the zero page has for the setup header: edd_mbr_sig_buffer follows.
SETUP_HEADER_ROOM_END = 0x290

_OFFSETS: tuple[tuple[str, int], ...] = (
    ("acpi_rsdp_addr", 0x070),
    ("ext_ramdisk_image", 0x0C0),
    ("ext_ramdisk_size", 0x0C4),
    ("ext_cmd_line_ptr", 0x0C8),
    ("e820_entries", 0x1E8),
    ("sentinel", 0x1EF),
    ("hdr", SETUP_HEADER_OFFSET),
    ("edd_mbr_sig_buffer", 0x290),
    ("e820_table", 0x2D0),
    ("eddbuf", 0xD00),
)
if ctypes.sizeof(boot_params) != ZERO_PAGE_SIZE:  # pragma: no cover - layout bug
    raise ImportError(f"boot_params is {ctypes.sizeof(boot_params)} bytes, not {ZERO_PAGE_SIZE}")
if ctypes.sizeof(setup_header) != 0x7B or ctypes.sizeof(boot_e820_entry) != 20:  # pragma: no cover
    raise ImportError("setup_header must be 0x7b bytes and boot_e820_entry 20 (boot.rst)")
for _name, _off in _OFFSETS:
    if getattr(boot_params, _name).offset != _off:  # pragma: no cover - layout bug
        raise ImportError(f"boot_params.{_name} is not at {_off:#x} (zero-page.rst)")
