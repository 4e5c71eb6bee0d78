"""GuestMemory: the only code that touches guest RAM.

One memfd per VM, sealed against growth and shrinking, mapped once into this process and
registered with KVM as one slot per RAM region. Every access is checked: the range must lie
wholly inside one RAM region (no straddling the MMIO hole), with no integer overflow.

Hot paths (virtqueues, descriptor chains, virtio-blk) check a range once with
`check_range`, which returns its offset in the memfd, and then access it through `ram`, one
view of the whole mapping indexed by those offsets: a ring checked at queue setup or a
buffer checked by the chain walker is never checked again per access. CPython bounds-checks
every index and slice of `ram` against the mapping, so even a wrong offset cannot reach
host memory outside guest RAM; teardown releases `ram`, so a device thread that kept it
fails instead of reading scrubbed pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Protocol, TypeVar

from isovisor.memory.errors import GuestMemoryClosedError, GuestMemoryError
from isovisor.memory.layout import MAX_MEMORY, MIN_MEMORY, PAGE_SIZE, ram_regions

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_U64_MAX = (1 << 64) - 1
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")

T = TypeVar("T", bound=ctypes.Structure)


class MemorySlotSink(Protocol):
    """What GuestMemory needs from a VM to register its RAM (kvm.VmFd satisfies it)."""

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None: ...


@dataclass(frozen=True)
class MemoryRegion:
    """A contiguous range of guest RAM backed by `offset` in the memfd."""

    guest_addr: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


class GuestMemory:
    """Guest RAM of one VM."""

    def __init__(self, size: int, *, name: str = "isovisor-guest-ram") -> None:
        if size % PAGE_SIZE:
            raise GuestMemoryError(f"guest memory size {size} is not a multiple of {PAGE_SIZE}")
        if not MIN_MEMORY <= size <= MAX_MEMORY:
            raise GuestMemoryError(
                f"guest memory size {size} is outside [{MIN_MEMORY}, {MAX_MEMORY}] bytes"
            )
        self._size = size
        self._lock = threading.Lock()
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self._fd, size)
            # The memfd can neither grow (no RAM appears behind KVM's back) nor shrink (a
            # shrink would turn guest accesses into SIGBUS in this process).
            fcntl.fcntl(
                self._fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
            )
            self._map: mmap.mmap | None = mmap.mmap(
                self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            # Guest RAM never merges with other VMs' pages (KSM side channels) and never
            # lands in a core dump of this process.
            self._map.madvise(mmap.MADV_UNMERGEABLE)
            self._map.madvise(mmap.MADV_DONTDUMP)
            # SAFETY: from_buffer exports the mapping only for the duration of addressof;
            # the temporary is dropped at once so close() can unmap later.
            self._host_base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            self._ram: memoryview | None = memoryview(self._map)
        except BaseException:
            os.close(self._fd)
            raise
        offset = 0
        regions = []
        for start, length in ram_regions(size):
            regions.append(MemoryRegion(start, length, offset))
            offset += length
        self.regions: tuple[MemoryRegion, ...] = tuple(regions)
        # check_range's fast path: the low region starts at guest address 0 and memfd
        # offset 0, so an address inside it is its own offset.
        assert regions[0].guest_addr == 0 and regions[0].offset == 0
        self._low_end = regions[0].end
        # A fresh memfd reads as zeros: RAM is zeroed before first use by construction.

    # --- properties -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def memfd(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._map is None

    def register(self, vm: MemorySlotSink, first_slot: int = 0) -> None:
        """Register each RAM region as a KVM memory slot."""
        for i, r in enumerate(self.regions):
            host_addr = self._host_base + r.offset
            vm.set_user_memory_region(first_slot + i, r.guest_addr, r.size, host_addr)

    # --- checks ----------------------------------------------------------------------

    def _mapping(self) -> mmap.mmap:
        m = self._map
        if m is None:
            raise GuestMemoryClosedError("guest memory has been torn down")
        return m

    @property
    def ram(self) -> memoryview:
        """All of guest RAM as one writable view, indexed by the memfd offsets
        `check_range` returns (see the module docstring). Borrowed: never release it;
        slices taken from it are the caller's to release."""
        ram = self._ram
        if ram is None:
            raise GuestMemoryClosedError("guest memory has been torn down")
        return ram

    def check_range(self, addr: int, length: int) -> int:
        """Return the memfd offset of [addr, addr+length) or raise GuestMemoryError."""
        if addr >= 0 and length >= 0 and addr + length <= self._low_end:
            return addr  # inside the low region (the usual case): offset == address
        if addr < 0 or length < 0 or addr > _U64_MAX or length > _U64_MAX:
            raise GuestMemoryError(f"invalid guest range {addr:#x}+{length:#x}")
        end = addr + length
        if end > _U64_MAX + 1:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} overflows 64 bits")
        for r in self.regions:
            if r.guest_addr <= addr < r.end or (length == 0 and addr == r.end):
                if end > r.end:
                    raise GuestMemoryError(
                        f"guest range {addr:#x}+{length:#x} runs past RAM ending at {r.end:#x}"
                    )
                return r.offset + (addr - r.guest_addr)
        raise GuestMemoryError(f"guest address {addr:#x} is not RAM")

    def is_ram(self, addr: int, length: int = 1) -> bool:
        try:
            self.check_range(addr, length)
        except GuestMemoryError:
            return False
        return True

    # --- bytes API ---------------------------------------------------------------------

    def view(self, addr: int, length: int) -> memoryview:
        """A writable zero-copy view of guest RAM (for preadv/pwritev-style I/O).

        The view pins the mapping: teardown refuses to unmap while views are alive.
        """
        off = self.check_range(addr, length)
        self._mapping()  # raises once torn down
        return self.ram[off : off + length]

    def read_exact(self, addr: int, length: int) -> bytes:
        off = self.check_range(addr, length)
        return self._mapping()[off : off + length]

    def write_all(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        length = len(memoryview(data).cast("B"))
        off = self.check_range(addr, length)
        self._mapping()[off : off + length] = bytes(data) if isinstance(data, memoryview) else data

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        off = self.check_range(addr, length)
        self._mapping()  # raises once torn down
        if length:
            # SAFETY: check_range proved [off, off+length) lies inside the live mapping.
            ctypes.memset(self._host_base + off, value, length)

    def read_obj(self, addr: int, cls: type[T]) -> T:
        return cls.from_buffer_copy(self.read_exact(addr, ctypes.sizeof(cls)))

    def write_obj(self, addr: int, obj: ctypes.Structure | ctypes.Array[ctypes.c_uint8]) -> None:
        self.write_all(addr, bytes(obj))

    def read_u8(self, addr: int) -> int:
        return self._mapping()[self.check_range(addr, 1)]

    def read_u16(self, addr: int) -> int:
        return int(_U16.unpack_from(self._mapping(), self.check_range(addr, 2))[0])

    def read_u32(self, addr: int) -> int:
        return int(_U32.unpack_from(self._mapping(), self.check_range(addr, 4))[0])

    def read_u64(self, addr: int) -> int:
        return int(_U64.unpack_from(self._mapping(), self.check_range(addr, 8))[0])

    def write_u8(self, addr: int, value: int) -> None:
        off = self.check_range(addr, 1)
        self._mapping()[off] = value  # ValueError outside 0..255

    def write_u16(self, addr: int, value: int) -> None:
        _U16.pack_into(self._mapping(), self.check_range(addr, 2), value)

    def write_u32(self, addr: int, value: int) -> None:
        _U32.pack_into(self._mapping(), self.check_range(addr, 4), value)

    def write_u64(self, addr: int, value: int) -> None:
        _U64.pack_into(self._mapping(), self.check_range(addr, 8), value)

    # --- teardown ---------------------------------------------------------------------

    def _resident_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) runs of pages of the mapping that are resident."""
        pages = (self._size + PAGE_SIZE - 1) // PAGE_SIZE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(self._host_base), ctypes.c_size_t(self._size), vec) != 0:
            return [(0, self._size)]  # cannot tell: scrub everything
        runs: list[tuple[int, int]] = []
        raw = bytes(vec)
        i = 0
        while i < pages:
            if raw[i] & 1:
                j = i
                while j < pages and raw[j] & 1:
                    j += 1
                runs.append((i * PAGE_SIZE, (j - i) * PAGE_SIZE))
                i = j
            else:
                i += 1
        return runs

    def close(self) -> None:
        """Scrub guest RAM (overwrite, then release the pages) and unmap it.

        After this, any other mapping of the memfd reads zeros.
        """
        with self._lock:
            m = self._map
            if m is None:
                return
            for off, length in self._resident_ranges():
                # SAFETY: off+length lies inside the live mapping (from mincore's page runs).
                ctypes.memset(self._host_base + off, 0, length)
            ret = _libc.fallocate(
                self._fd,
                _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                ctypes.c_long(0),
                ctypes.c_long(self._size),
            )
            if ret != 0:  # pragma: no cover - tmpfs supports hole punching
                err = ctypes.get_errno()
                raise GuestMemoryError(f"scrubbing guest memory failed: {os.strerror(err)}")
            self._map = None
            ram, self._ram = self._ram, None
            try:
                if ram is not None:
                    ram.release()  # holders of `ram` now fail instead of reading zeros
                m.close()
            except BufferError:
                # A device still holds a view: keep the (already scrubbed) mapping alive
                # rather than unmap memory under it; it goes when the last view does.
                pass
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
