"""Linux 64-bit boot protocol: bzImage and vmlinux, the zero page byte by byte, the real kernel."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.memory import GuestMemory
from isovisor.vmm.boot import boot_params as bp
from isovisor.vmm.boot.errors import BootImageError
from isovisor.vmm.boot.linux import cmdline_limit, initrd_addr_max
from isovisor.vmm.boot.loader import load_kernel
from tests.vmm.boot_images import MB, Seg, build_bzimage, build_elf, pattern, pvh_note

MEM = 64 * MB
ZP = 0x7000  # BOOT_PARAMS_ADDR
CMDLINE = 0x2_0000
PM = pattern(0x2345 * 16, seed=5)  # protected-mode code: syssize * 16 bytes
TEST_KERNEL = (
    Path(__file__).resolve().parents[3] / "shared" / "guest-kernels" / "vmlinux-virtio-6.1"
)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(MEM) as m:
        yield m


def zp_u(mem: GuestMemory, offset: int, size: int) -> int:
    return int.from_bytes(mem.read_exact(ZP + offset, size), "little")


def e820(mem: GuestMemory) -> list[tuple[int, int, int]]:
    n = zp_u(mem, 0x1E8, 1)
    raw = mem.read_exact(ZP + 0x2D0, 20 * n)
    return [struct.unpack_from("<QQI", raw, 20 * i) for i in range(n)]


E820_64M = [(0, 0x9_FC00, 1), (0x9_FC00, 0x6_0400, 2), (0x10_0000, MEM - 0x10_0000, 1)]


# --- structure layout against the documents ---------------------------------------------------


@pytest.mark.parametrize(
    ("field", "offset", "size"),
    [
        ("setup_sects", 0x1F1, 1),
        ("syssize", 0x1F4, 4),
        ("boot_flag", 0x1FE, 2),
        ("header", 0x202, 4),
        ("version", 0x206, 2),
        ("type_of_loader", 0x210, 1),
        ("loadflags", 0x211, 1),
        ("code32_start", 0x214, 4),
        ("ramdisk_image", 0x218, 4),
        ("ramdisk_size", 0x21C, 4),
        ("heap_end_ptr", 0x224, 2),
        ("cmd_line_ptr", 0x228, 4),
        ("initrd_addr_max", 0x22C, 4),
        ("kernel_alignment", 0x230, 4),
        ("relocatable_kernel", 0x234, 1),
        ("xloadflags", 0x236, 2),
        ("cmdline_size", 0x238, 4),
        ("setup_data", 0x250, 8),
        ("pref_address", 0x258, 8),
        ("init_size", 0x260, 4),
        ("kernel_info_offset", 0x268, 4),
    ],
)
def test_setup_header_offsets(field: str, offset: int, size: int) -> None:
    f = getattr(bp.setup_header, field)
    assert (0x1F1 + f.offset, f.size) == (offset, size)


def test_zero_page_offsets() -> None:
    assert ctypes.sizeof(bp.boot_params) == 4096
    for field, offset in [
        ("acpi_rsdp_addr", 0x70),
        ("ext_ramdisk_image", 0xC0),
        ("ext_ramdisk_size", 0xC4),
        ("ext_cmd_line_ptr", 0xC8),
        ("e820_entries", 0x1E8),
        ("hdr", 0x1F1),
        ("e820_table", 0x2D0),
    ]:
        assert getattr(bp.boot_params, field).offset == offset
    assert bp.boot_params.e820_table.size == 128 * 20


def test_old_protocol_defaults() -> None:
    hdr = bp.setup_header(version=0x0205, cmdline_size=4096, initrd_addr_max=0x1000)
    assert cmdline_limit(hdr) == 255
    hdr.version = 0x0202
    assert initrd_addr_max(hdr) == 0x37FF_FFFF
    hdr.version = 0x0206
    assert (cmdline_limit(hdr), initrd_addr_max(hdr)) == (4096, 0x1000)


# --- bzImage ---------------------------------------------------------------------------------


def test_bzimage_zero_page(mem: GuestMemory) -> None:
    img = build_bzimage(PM, init_size=0x80_0000)
    initrd = pattern(0x5001, seed=2)
    boot = load_kernel(mem, img, cmdline="root=/dev/vda", initrd=initrd, acpi_rsdp=0xE_0000)
    load = 0x100_0000  # pref_address, relocatable and fitting
    assert (boot.protocol, boot.entry, boot.boot_struct) == ("linux64", load + 0x200, ZP)
    assert (boot.kernel_start, boot.kernel_end) == (load, load + 0x80_0000)
    assert mem.read_exact(load, len(PM)) == PM
    initrd_addr = (MEM - len(initrd)) & ~0xFFF
    assert boot.initrd == (initrd_addr, len(initrd))
    assert mem.read_exact(initrd_addr, len(initrd)) == initrd

    # Header bytes copied from the image, then the loader's fields (boot.rst).
    assert zp_u(mem, 0x1F1, 1) == 4
    assert zp_u(mem, 0x1F4, 4) == len(PM) // 16
    assert zp_u(mem, 0x1FA, 2) == 0xFFFF
    assert zp_u(mem, 0x1FE, 2) == 0xAA55
    assert mem.read_exact(ZP + 0x200, 6) == b"\xeb\x6aHdrS"
    assert zp_u(mem, 0x206, 2) == 0x020F
    assert zp_u(mem, 0x210, 1) == 0xFF  # type_of_loader
    assert zp_u(mem, 0x211, 1) == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert zp_u(mem, 0x224, 2) == 0xFE00  # heap_end_ptr
    assert zp_u(mem, 0x228, 4) == CMDLINE
    assert zp_u(mem, 0xC8, 4) == 0  # ext_cmd_line_ptr
    assert (zp_u(mem, 0x218, 4), zp_u(mem, 0x21C, 4)) == (initrd_addr, len(initrd))
    assert (zp_u(mem, 0xC0, 4), zp_u(mem, 0xC4, 4)) == (0, 0)
    assert zp_u(mem, 0x230, 4) == 0x20_0000
    assert zp_u(mem, 0x238, 4) == 0x7FF
    assert zp_u(mem, 0x258, 8) == 0x100_0000
    assert zp_u(mem, 0x70, 8) == 0xE_0000  # acpi_rsdp_addr
    assert e820(mem) == E820_64M
    assert mem.read_exact(CMDLINE, 14) == b"root=/dev/vda\0"
    # Nothing but the header lands in the zero page: the real-mode code is not copied.
    assert mem.read_exact(ZP, 0x70) == bytes(0x70)
    assert mem.read_exact(ZP + 0x26C, 0x290 - 0x26C) == bytes(0x24)


def test_only_the_declared_header_is_copied(mem: GuestMemory) -> None:
    img = bytearray(build_bzimage(PM, header_end=0x268))
    img[0x268:0x290] = b"\xcc" * 0x28  # beyond 0x202 + byte at 0x201
    load_kernel(mem, bytes(img))
    assert mem.read_exact(ZP + 0x268, 0x28) == bytes(0x28)
    img2 = bytearray(build_bzimage(PM, header_end=0x280))
    img2[0x26C:0x280] = b"\xcc" * 0x14  # a newer kernel's longer header is copied whole
    load_kernel(mem, bytes(img2))
    assert mem.read_exact(ZP + 0x26C, 0x14) == b"\xcc" * 0x14


def test_setup_sects_zero_means_four(mem: GuestMemory) -> None:
    img = build_bzimage(PM, setup_sects=0)
    assert img[5 * 512 :] == PM
    load_kernel(mem, img)
    assert mem.read_exact(0x100_0000, 16) == PM[:16]


def test_bzimage_relocates_when_pref_address_does_not_fit(mem: GuestMemory) -> None:
    img = build_bzimage(PM, pref_address=0x1_0000_0000, kernel_alignment=0x40_0000)
    boot = load_kernel(mem, img)
    assert (boot.kernel_start, boot.entry) == (0x40_0000, 0x40_0200)
    assert mem.read_exact(0x40_0000, len(PM)) == PM


def test_bzimage_unaligned_pref_address_is_not_used(mem: GuestMemory) -> None:
    img = build_bzimage(PM, pref_address=0x100_1000)
    assert load_kernel(mem, img).kernel_start == 0x20_0000


def test_non_relocatable_bzimage(mem: GuestMemory) -> None:
    img = build_bzimage(PM, relocatable=0, pref_address=0x100_1000, kernel_alignment=3)
    assert load_kernel(mem, img).kernel_start == 0x100_1000
    far = build_bzimage(PM, relocatable=0, pref_address=0x8000_0000)
    with pytest.raises(
        BootImageError,
        match=r"not relocatable, and its preferred address "
        r"0x80000000 \+ 0x123450 is not in guest RAM",
    ):
        load_kernel(mem, far)


def test_init_size_past_ram(mem: GuestMemory) -> None:
    img = build_bzimage(PM, init_size=MEM)
    with pytest.raises(
        BootImageError, match=r"bzImage protected-mode code at 0x200000 .* lies outside guest RAM"
    ):
        load_kernel(mem, img)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 0x020B}, r"boot protocol 2.11 is too old: the 64-bit entry needs 2.12"),
        ({"version": 0x0200}, r"boot protocol 2.00 is too old"),
        ({"xloadflags": 0x02}, r"not 64-bit capable \(xloadflags lacks XLF_KERNEL_64\)"),
        ({"loadflags": 0}, r"a zImage"),
        ({"boot_flag": 0x1234}, r"boot_flag at 0x1fe is 0x1234, not 0xaa55"),
        ({"magic": b"HdrT"}, r"neither an ELF file"),
        ({"header_end": 0x250}, r"setup header ends at 0x250 \(0x202 \+ byte at 0x201\)"),
        ({"header_end": 0x2FF}, r"setup header ends at 0x2ff"),
        ({"kernel_alignment": 0x30_0000}, r"kernel_alignment 0x300000 is not a power of two"),
        ({"kernel_alignment": 0}, r"kernel_alignment 0x0 is not a power of two"),
        ({"kernel_alignment": 0x8000_0000}, r"kernel_alignment 0x80000000"),
        (
            {"syssize": len(PM) // 16 + 1},
            r"truncated: syssize says 0x23460 bytes of "
            r"protected-mode code, the file has 0x23450",
        ),
    ],
)
def test_bzimage_rejections(mem: GuestMemory, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(BootImageError, match="kernel image: " + message):
        load_kernel(mem, build_bzimage(PM, **kwargs))  # type: ignore[arg-type]
    assert mem.read_exact(0x100_0000, 16) == bytes(16)
    assert mem.read_exact(ZP, 4096) == bytes(4096)


def test_bzimage_without_protected_mode_code(mem: GuestMemory) -> None:
    img = build_bzimage(b"", syssize=0)
    with pytest.raises(BootImageError, match=r"no protected-mode code after the 0xa00 bytes"):
        load_kernel(mem, img)


@pytest.mark.parametrize("cut", [0x206, 0x250, 0x26B])
def test_bzimage_truncated_header(mem: GuestMemory, cut: int) -> None:
    with pytest.raises(BootImageError, match="kernel image: "):
        load_kernel(mem, build_bzimage(PM)[:cut], protocol="linux")


def test_bzimage_truncated_code(mem: GuestMemory) -> None:
    with pytest.raises(BootImageError, match="kernel image: truncated: syssize"):
        load_kernel(mem, build_bzimage(PM)[:-1])


def test_bzimage_cmdline_size(mem: GuestMemory) -> None:
    img = build_bzimage(PM, cmdline_size=16)
    load_kernel(mem, img, cmdline="a" * 16)
    assert mem.read_exact(CMDLINE, 17) == b"a" * 16 + b"\0"
    with pytest.raises(
        BootImageError,
        match=r"command line: 17 bytes is longer than the limit "
        r"of 16 bytes \(the kernel's cmdline_size\)",
    ):
        load_kernel(mem, img, cmdline="a" * 17)


def test_bzimage_initrd_addr_max(mem: GuestMemory) -> None:
    img = build_bzimage(PM, initrd_addr_max=0x1FF_FFFF, init_size=0x20_0000)
    boot = load_kernel(mem, img, initrd=bytes(0x1800))
    assert boot.initrd == (0x200_0000 - 0x2000, 0x1800)
    with pytest.raises(
        BootImageError,
        match=r"initrd: 0xe00001 bytes do not fit between the "
        r"kernel's end 0x1200000 and 0x2000000 \(the kernel's initrd_addr_max\)",
    ):
        load_kernel(mem, img, initrd=bytes(0xE0_0001))


def test_initrd_must_not_overlap_init_size(mem: GuestMemory) -> None:
    img = build_bzimage(PM, init_size=MEM - 0x100_0000)
    with pytest.raises(BootImageError, match=r"initrd: .* do not fit"):
        load_kernel(mem, img, initrd=b"x")


# --- vmlinux ---------------------------------------------------------------------------------


def test_vmlinux_zero_page_from_scratch(mem: GuestMemory) -> None:
    code = pattern(0x1000)
    img = build_elf([Seg(0x100_0000, code, 0x4000)], entry=0x100_0000)
    boot = load_kernel(mem, img, cmdline="quiet", initrd=b"\x42" * 100)
    assert (boot.protocol, boot.entry, boot.boot_struct) == ("linux64", 0x100_0000, ZP)
    assert boot.initrd == (MEM - 0x1000, 100)
    assert zp_u(mem, 0x1FE, 2) == 0xAA55
    assert mem.read_exact(ZP + 0x202, 4) == b"HdrS"
    assert zp_u(mem, 0x206, 2) >= 0x020C
    assert (zp_u(mem, 0x210, 1), zp_u(mem, 0x211, 1)) == (0xFF, 0x81)
    assert zp_u(mem, 0x228, 4) == CMDLINE
    assert (zp_u(mem, 0x218, 4), zp_u(mem, 0x21C, 4)) == (MEM - 0x1000, 100)
    assert zp_u(mem, 0x70, 8) == 0  # no RSDP given
    assert e820(mem) == E820_64M
    assert mem.read_exact(CMDLINE, 6) == b"quiet\0"


def test_linux_protocol_on_a_pvh_vmlinux(mem: GuestMemory) -> None:
    img = build_elf(
        [Seg(0x100_0000, pattern(0x1000))], entry=0x100_0000, notes=pvh_note(0x100_0800, 8)
    )
    assert load_kernel(mem, img).protocol == "pvh"
    boot = load_kernel(mem, img, protocol="linux")
    assert (boot.protocol, boot.entry) == ("linux64", 0x100_0000)


def test_linux_protocol_on_elf32(mem: GuestMemory) -> None:
    img = build_elf([Seg(MB, pattern(0x100))], entry=MB, bits=32, notes=pvh_note(MB))
    with pytest.raises(BootImageError, match="needs an ELF64 x86_64 vmlinux, this is ELF32"):
        load_kernel(mem, img, protocol="linux")


def test_linux_protocol_on_garbage(mem: GuestMemory) -> None:
    with pytest.raises(BootImageError, match="neither an ELF file"):
        load_kernel(mem, pattern(8192), protocol="linux")


# --- the real test kernel --------------------------------------------------------------------


def _pvh_note_entry(kernel: bytes) -> int:
    """Find XEN_ELFNOTE_PHYS32_ENTRY by hand (ELF64 little-endian; notes 4-byte aligned)."""
    (phoff,) = struct.unpack_from("<Q", kernel, 0x20)
    (phnum,) = struct.unpack_from("<H", kernel, 0x38)
    for i in range(phnum):
        p_type, _, off, _, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", kernel, phoff + 56 * i)
        pos = off
        while p_type == 4 and pos < off + filesz:
            namesz, descsz, ntype = struct.unpack_from("<III", kernel, pos)
            name = kernel[pos + 12 : pos + 12 + namesz]
            desc_at = pos + 12 + (namesz + 3) // 4 * 4
            if name == b"Xen\0" and ntype == 18:
                return int.from_bytes(kernel[desc_at : desc_at + descsz], "little")
            pos = desc_at + (descsz + 3) // 4 * 4
    raise AssertionError("no PVH note in the test kernel")


@pytest.fixture(scope="module")
def real_kernel() -> bytes:
    if not TEST_KERNEL.exists():
        pytest.fail(f"test kernel missing: {TEST_KERNEL}")
    return TEST_KERNEL.read_bytes()


def test_real_kernel_pvh_and_linux_entries(real_kernel: bytes) -> None:
    (e_entry,) = struct.unpack_from("<Q", real_kernel, 0x18)
    with GuestMemory(256 * MB) as m:
        boot = load_kernel(m, real_kernel, cmdline="console=ttyS0")
        assert boot.protocol == "pvh"
        assert boot.entry == _pvh_note_entry(real_kernel)
        assert boot.kernel_start == e_entry == 0x100_0000
        assert m.read_exact(0x100_0000, 4096) == real_kernel[0x20_0000:0x20_1000]
    with GuestMemory(256 * MB) as m:
        boot = load_kernel(
            m, real_kernel, protocol="linux", cmdline="console=ttyS0", initrd=b"\x07" * 4096
        )
        assert (boot.protocol, boot.entry, boot.boot_struct) == ("linux64", e_entry, ZP)
        assert boot.initrd == (256 * MB - 4096, 4096)
        assert boot.kernel_end <= boot.initrd[0]
        assert m.read_exact(ZP + 0x202, 4) == b"HdrS"
        assert m.read_exact(e_entry, 16) == real_kernel[0x20_0000:0x20_0010]
