"""Descriptor chains of a split virtqueue, walked with every check inside the walk.

`walk_chain` is the one walker: `DescriptorChain` (iterating it, `descriptors()`) and
`Virtqueue.walk` (the virtio-blk fast path) both go through it.

A chain is guest-controlled data: its descriptors, their `next` links, lengths, flags and
any indirect table. Walking it is therefore where the rules of virtio 1.2 §2.7.4-§2.7.5
are enforced, once, before a device looks at a single buffer:

- the head and every `next` index lie inside the table (§2.7.5: a table has Queue Size
  entries; an indirect table has len/16);
- a hop budget of the table size bounds the walk, so loops end as an error (§2.7.5.2:
  "loops in the descriptor chain are forbidden", §2.7.5.3.1: no chain longer than Queue
  Size);
- one level of indirect tables: only with VIRTIO_F_INDIRECT_DESC, never nested, never
  with NEXT, a length that is a non-zero multiple of 16 and no more than Queue Size
  entries, inside RAM (§2.7.5.3.1);
- the total length fits in 32 bits (§2.7.5.2: no chain longer than 2^32 bytes);
- device-readable descriptors come before device-writable ones (§2.7.4.2);
- every buffer lies inside guest RAM (GuestMemory.check_range: no MMIO hole, no wrap).

Each descriptor is checked once, here, and carries its memfd `offset` on: devices access
its bytes through `GuestMemory.ram[offset : offset + len]` without checking it again. The
table is range-checked once per walk (the queue checked it at setup already; this is
defence in depth), then its entries are read straight from `ram`.

Any violation is a GuestProtocolError: a broken or hostile driver, after which the device
stops and asks for a reset. A request that is well-formed as a chain but wrong for the
device (a bad header, say) is a BadRequest: that request fails, the device carries on.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from isovisor.devices.virtio.constants import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    MAX_CHAIN_BYTES,
)
from isovisor.memory import GuestMemory, GuestMemoryError

_DESC = struct.Struct("<QIHH")  # struct virtq_desc (§2.7.5), little-endian


class VirtioError(Exception):
    """Base of the virtio package's errors."""


class GuestProtocolError(VirtioError):
    """The driver broke the virtio protocol (malformed rings or chains): possibly hostile.

    The device that sees it goes to DEVICE_NEEDS_RESET and reports a security event."""


class BadRequest(VirtioError):  # noqa: N818 - the name the design uses
    """One request is malformed for its device; that request fails, the device continues."""


class Descriptor(NamedTuple):
    """One checked buffer of a chain: [addr, addr+len) lies inside guest RAM, at `offset`
    in the memfd (what GuestMemory.check_range returned for it)."""

    addr: int
    len: int
    writable: bool
    offset: int


_new_tuple = tuple.__new__  # Descriptor(...) without NamedTuple's Python-level __new__


def _checked_table(mem: GuestMemory, addr: int, length: int, what: str) -> int:
    try:
        return mem.check_range(addr, length)
    except GuestMemoryError as exc:
        raise GuestProtocolError(f"{what}: {exc}") from exc


def walk_chain(
    mem: GuestMemory,
    desc_table: int,
    queue_size: int,
    head: int,
    *,
    indirect_allowed: bool,
    table_offset: int | None = None,
) -> tuple[Descriptor, ...]:
    """Walk and validate the chain at `head` (every rule in the module docstring); every
    descriptor, checked, or a GuestProtocolError.

    `table_offset`: the memfd offset of the (already range-checked) descriptor table, from
    the queue that checked it at setup; None checks the table here."""
    table, size = desc_table, queue_size
    index = head
    if not 0 <= index < size:
        # §2.7.6: available ring entries are heads of chains in the table.
        raise GuestProtocolError(f"chain head {index} is outside the queue of size {size}")
    toff = table_offset
    if toff is None:
        toff = _checked_table(mem, table, size * DESC_SIZE, "descriptor table")
    ram = mem.ram
    check_range = mem.check_range
    unpack = _DESC.unpack_from
    budget = size  # hops left in the current table (§2.7.5.2, §2.7.5.3.1)
    in_indirect = False
    total = 0
    seen_writable = False
    out: list[Descriptor] = []
    while True:
        if budget == 0:
            # §2.7.5.2 / §2.7.5.3.1: no chain longer than the table: this is a loop.
            raise GuestProtocolError(
                f"descriptor chain from head {head} exceeds {size} hops (a loop?)"
            )
        budget -= 1
        # index < size always holds here (the head and every `next` are checked), so the
        # entry lies inside the checked table.
        addr, length, flags, nxt = unpack(ram, toff + index * DESC_SIZE)
        if flags & DESC_F_INDIRECT:
            size = _indirect_entries(length, flags, in_indirect, indirect_allowed, queue_size)
            table = addr
            toff = _checked_table(mem, table, length, "indirect table")
            in_indirect, index, budget = True, 0, size
            continue
        writable = bool(flags & DESC_F_WRITE)
        if writable:
            seen_writable = True
        elif seen_writable:
            # §2.7.4.2: device-writable descriptors come after device-readable ones.
            raise GuestProtocolError(
                f"device-readable descriptor {index} follows a device-writable one"
            )
        total += length
        if total > MAX_CHAIN_BYTES:
            # §2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes".
            raise GuestProtocolError(f"descriptor chain totals {total} bytes (> 2^32 - 1)")
        try:
            offset = check_range(addr, length)
        except GuestMemoryError as exc:
            # Buffers are guest-physical RAM; anything else (MMIO hole, past the end,
            # 64-bit wrap) is not the driver's to hand us.
            raise GuestProtocolError(f"descriptor {index} buffer: {exc}") from exc
        out.append(_new_tuple(Descriptor, (addr, length, writable, offset)))
        if not flags & DESC_F_NEXT:
            return tuple(out)
        if not 0 <= nxt < size:
            # §2.7.5: `next` indexes the same table (Queue Size or len/16 entries).
            raise GuestProtocolError(
                f"descriptor {index} links to {nxt}, outside a table of {size}"
            )
        index = nxt


def _indirect_entries(
    length: int, flags: int, in_indirect: bool, allowed: bool, queue_size: int
) -> int:
    """Check an indirect descriptor (§2.7.5.3.1); return its table's entries."""
    if not allowed:
        raise GuestProtocolError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
    if in_indirect:
        raise GuestProtocolError("nested indirect descriptor table")
    if flags & DESC_F_NEXT:
        raise GuestProtocolError("descriptor has both INDIRECT and NEXT")
    if length == 0 or length % DESC_SIZE:
        raise GuestProtocolError(
            f"indirect table length {length} is not a non-zero multiple of {DESC_SIZE}"
        )
    entries = length // DESC_SIZE
    if entries > queue_size:
        # §2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than the Queue
        # Size of the device."
        raise GuestProtocolError(
            f"indirect table of {entries} entries exceeds queue size {queue_size}"
        )
    return entries


class DescriptorChain:
    """The chain starting at descriptor `head` of a queue's descriptor table.

    The first use walks the whole chain and validates it, then caches the result:
    iterating, `descriptors()` and the helpers below all see either every descriptor,
    checked, or a GuestProtocolError before any of them, so a malformed tail is found
    before any buffer is touched.
    """

    __slots__ = (
        "_cache",
        "_table_offset",
        "desc_table",
        "head",
        "indirect_allowed",
        "mem",
        "queue_size",
    )

    def __init__(
        self,
        mem: GuestMemory,
        desc_table: int,
        queue_size: int,
        head: int,
        *,
        indirect_allowed: bool,
        table_offset: int | None = None,
    ) -> None:
        """`table_offset`: the memfd offset of the (already range-checked) descriptor
        table, from the queue that checked it; None checks the table again."""
        self.mem = mem
        self.desc_table = desc_table
        self.queue_size = queue_size
        self.head = head
        self.indirect_allowed = indirect_allowed
        self._table_offset = table_offset
        self._cache: tuple[Descriptor, ...] | None = None

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors())

    # --- the validated chain ---------------------------------------------------------

    def descriptors(self) -> tuple[Descriptor, ...]:
        """Every descriptor, the whole chain validated (GuestProtocolError otherwise)."""
        if self._cache is None:
            self._cache = walk_chain(
                self.mem, self.desc_table, self.queue_size, self.head,
                indirect_allowed=self.indirect_allowed, table_offset=self._table_offset,
            )
        return self._cache

    @property
    def readable(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.descriptors() if not d.writable)

    @property
    def writable(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.descriptors() if d.writable)

    @property
    def readable_len(self) -> int:
        return sum(d.len for d in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(d.len for d in self.writable)

    def readable_bytes(self, max_len: int) -> bytes:
        """All device-readable bytes, concatenated (a copy: the guest cannot change them
        under the parser). More than `max_len` of them is a BadRequest."""
        if self.readable_len > max_len:
            raise BadRequest(f"{self.readable_len} device-readable bytes exceed {max_len}")
        ram = self.mem.ram
        return b"".join(ram[d.offset : d.offset + d.len] for d in self.readable)

    def write_writable(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy `data` into the device-writable buffers starting `offset` bytes in.

        Returns the bytes written; data that does not fit is a BadRequest (nothing is
        written then)."""
        src = memoryview(data).cast("B")
        if offset < 0 or offset + len(src) > self.writable_len:
            raise BadRequest(
                f"{len(src)} bytes at offset {offset} do not fit {self.writable_len} "
                "device-writable bytes"
            )
        pos = 0
        skip = offset
        for d in self.writable:
            if pos == len(src):
                break
            if skip >= d.len:
                skip -= d.len
                continue
            n = min(d.len - skip, len(src) - pos)
            at = d.offset + skip
            self.mem.ram[at : at + n] = src[pos : pos + n]
            pos += n
            skip = 0
        return pos

    @contextmanager
    def writable_views(self) -> Iterator[list[memoryview]]:
        """Zero-copy views of the device-writable buffers (for readv/preadv), released on
        exit so guest memory teardown is never blocked by a forgotten view."""
        ram = self.mem.ram
        views = [ram[d.offset : d.offset + d.len] for d in self.writable]
        try:
            yield views
        finally:
            for v in views:
                v.release()

    @contextmanager
    def readable_views(self) -> Iterator[list[memoryview]]:
        """Zero-copy views of the device-readable buffers (for writev/pwritev). The guest
        can change these bytes at any time: parse headers from readable_bytes() instead."""
        ram = self.mem.ram
        views = [ram[d.offset : d.offset + d.len] for d in self.readable]
        try:
            yield views
        finally:
            for v in views:
                v.release()
