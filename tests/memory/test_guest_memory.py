"""GuestMemory: checked access, the MMIO hole, sealing, KSM/dump advice, scrub at teardown."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.memory import GuestMemory, GuestMemoryClosedError, GuestMemoryError
from isovisor.memory.layout import MMIO_HOLE_END, MMIO_HOLE_START, GiB, MiB

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory(32 * MiB)
    yield m
    m.close()


def test_roundtrip_and_objects(mem: GuestMemory) -> None:
    mem.write_all(0x1000, b"isovisor")
    assert mem.read_exact(0x1000, 8) == b"isovisor"
    mem.write_u64(0x2000, 0x1122334455667788)
    assert mem.read_u32(0x2000) == 0x55667788
    assert mem.read_u16(0x2006) == 0x1122

    class Pair(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint16)]

    mem.write_obj(0x3000, Pair(7, 9))
    got = mem.read_obj(0x3000, Pair)
    assert (got.a, got.b) == (7, 9)


def test_view_is_zero_copy(mem: GuestMemory) -> None:
    v = mem.view(0x4000, 16)
    v[:4] = b"abcd"
    assert mem.read_exact(0x4000, 4) == b"abcd"
    v.release()


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (32 * MiB, 1),  # first byte past RAM
        (32 * MiB - 4, 8),  # straddles the end
        (-1, 1),
        (0, -1),
        ((1 << 64) - 1, 2),  # wraps 64 bits
        (1 << 70, 1),
    ],
)
def test_out_of_range_is_refused(mem: GuestMemory, addr: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        mem.read_exact(addr, length)
    with pytest.raises(GuestMemoryError):
        mem.write_all(addr, b"x" * max(length, 0)) if length >= 0 else mem.check_range(addr, length)


def test_memory_above_the_hole_and_no_straddling() -> None:
    m = GuestMemory(3 * GiB + 64 * MiB)
    try:
        assert [(r.guest_addr, r.size) for r in m.regions] == [
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, 64 * MiB),
        ]
        assert not m.is_ram(MMIO_HOLE_START)
        assert not m.is_ram(0xFEE0_0000)
        with pytest.raises(GuestMemoryError, match="runs past RAM"):
            m.read_exact(MMIO_HOLE_START - 4, 8)
        m.write_u32(MMIO_HOLE_END, 0xCAFE)
        assert m.read_u32(MMIO_HOLE_END) == 0xCAFE
        # the byte after the hole maps right after the low RAM in the memfd
        fd = os.dup(m.memfd)
        try:
            other = mmap.mmap(fd, m.size, mmap.MAP_SHARED, mmap.PROT_READ)
            assert other[MMIO_HOLE_START : MMIO_HOLE_START + 4] == (0xCAFE).to_bytes(4, "little")
            other.close()
        finally:
            os.close(fd)
    finally:
        m.close()


def test_sizes_are_validated() -> None:
    with pytest.raises(GuestMemoryError, match="multiple of 4096"):
        GuestMemory(32 * MiB + 1)
    with pytest.raises(GuestMemoryError, match="outside"):
        GuestMemory(4096)


def test_memfd_is_sealed_against_growth(mem: GuestMemory) -> None:
    seals = fcntl.fcntl(mem.memfd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
    with pytest.raises(PermissionError):
        os.ftruncate(mem.memfd, mem.size * 2)


def test_ram_is_zero_before_first_use(mem: GuestMemory) -> None:
    assert mem.read_exact(0, 1 * MiB) == bytes(1 * MiB)
    assert mem.read_exact(mem.size - 4096, 4096) == bytes(4096)


def test_mapping_is_not_mergeable_nor_dumped(mem: GuestMemory) -> None:
    mem.write_all(0, b"\1")  # make the VMA show up populated
    smaps = Path("/proc/self/smaps").read_text()
    block = next(
        b
        for b in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps)
        if "isovisor-guest-ram" in b.split("\n")[0]
    )
    flags = re.search(r"VmFlags:(.*)", block)
    assert flags is not None
    assert "dd" in flags.group(1).split()  # MADV_DONTDUMP
    assert "mg" not in flags.group(1).split()  # not KSM-mergeable


def test_teardown_scrubs_ram_seen_through_another_mapping() -> None:
    m = GuestMemory(32 * MiB)
    secret = b"tenant-A-secret!" * 256
    m.write_all(0x10_0000, secret)
    m.write_all(m.size - len(secret), secret)
    fd = os.dup(m.memfd)
    try:
        other = mmap.mmap(fd, m.size, mmap.MAP_SHARED, mmap.PROT_READ)
        assert other[0x10_0000 : 0x10_0000 + len(secret)] == secret
        m.close()
        assert other[0x10_0000 : 0x10_0000 + len(secret)] == bytes(len(secret))
        assert other[:] == bytes(m.size)
        other.close()
    finally:
        os.close(fd)
    with pytest.raises(GuestMemoryClosedError):
        m.read_exact(0, 1)


def test_teardown_with_a_live_view_does_not_unmap_under_it() -> None:
    m = GuestMemory(16 * MiB)
    m.write_all(0, b"x")
    v = m.view(0, 4096)
    m.close()  # scrubs; keeps the mapping while the view lives
    assert bytes(v[:1]) == b"\0"
    v.release()


def test_only_guest_memory_touches_guest_ram() -> None:
    """No module outside isovisor/memory maps or slices guest RAM directly."""
    offenders = []
    for path in (REPO / "isovisor").rglob("*.py"):
        if path.parts[-2] == "memory":
            continue
        text = path.read_text()
        # GuestMemory's private mapping and base address, its memfd name, or a ctypes view
        # built over a GuestMemory object
        if re.search(r"\.(_map|_host_base)\b|isovisor-guest-ram|from_buffer\(.*mem", text):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


@settings(max_examples=300, deadline=None)
@given(addr=st.integers(-(1 << 65), 1 << 65), length=st.integers(-10, 1 << 33))
def test_check_range_never_admits_outside_ram(addr: int, length: int) -> None:
    m = _SHARED
    try:
        off = m.check_range(addr, length)
    except GuestMemoryError:
        return
    assert addr >= 0 and addr + length <= m.size
    assert off == addr and 0 <= off + length <= m.size


_SHARED = GuestMemory(16 * MiB)


def test_ram_view_is_bounded_and_dies_with_teardown() -> None:
    """`ram` (the hot path's view, indexed by check_range offsets) cannot reach past guest
    RAM, and a device that kept it fails after teardown instead of reading scrubbed pages."""
    import struct

    m = GuestMemory(16 * MiB)
    ram = m.ram
    assert len(ram) == m.size and not ram.readonly
    off = m.check_range(0x1000, 2)
    struct.pack_into("<H", ram, off, 0xBEEF)
    assert m.read_u16(0x1000) == 0xBEEF
    with pytest.raises(struct.error):
        struct.unpack_from("<Q", ram, m.size - 4)  # CPython's bounds check
    with pytest.raises(struct.error):
        struct.pack_into("<I", ram, m.size, 1)
    assert len(ram[m.size - 2 : m.size + 4096]) == 2  # slices stop at the mapping's end
    m.close()
    with pytest.raises(GuestMemoryClosedError):
        m.ram  # noqa: B018
    with pytest.raises(ValueError):
        ram[0]  # released by close()


def test_offsets_above_the_hole() -> None:
    m = GuestMemory(3 * GiB + 16 * MiB)
    try:
        assert m.check_range(MMIO_HOLE_START - 8, 8) == MMIO_HOLE_START - 8
        off = m.check_range(MMIO_HOLE_END + 0x1000, 8)
        assert off == MMIO_HOLE_START + 0x1000  # the high region follows the low in the memfd
        m.write_u64(MMIO_HOLE_END + 0x1000, 0x1122334455667788)
        assert bytes(m.ram[off : off + 8]) == (0x1122334455667788).to_bytes(8, "little")
    finally:
        m.close()
