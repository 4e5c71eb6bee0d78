"""Split virtqueues (virtio 1.2 §2.7): the device side of the three rings in guest memory.

`QueueConfig` is what the transport's registers set up; `check_layout` is the setup check
run when the driver marks a queue ready; `Virtqueue` is the running queue a device pops
chains from and returns used buffers to, with VIRTIO_F_EVENT_IDX notification suppression
(§2.7.7, §2.7.10).

Memory ordering. The driver runs on other CPUs and writes the rings concurrently. This is
x86-64 only (KVM on x86): under x86-TSO loads are not reordered with older loads and stores
not with older stores, so reading `avail.idx` before the ring entry and descriptors, and
writing a used element before `used.idx` (§2.7.8.2), need no fence. The one reordering x86
does allow, a later load passing an earlier store, matters where the device publishes an
index and then reads the driver's suppression field (or the reverse): there `_full_fence`
runs a locked instruction.

Speed. The rings are range-checked once, when the queue is set up (`check_layout`, again
in `Virtqueue.__init__`), and from then on read and written through `GuestMemory.ram` at
the memfd offsets that check returned: no per-access check. `pop_heads` takes every
available chain head with one read of avail.idx (a device serving a notify drains the
ring in one go); each chain is still walked and validated on its own (`chain`).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from isovisor.devices.virtio.chain import (
    Descriptor,
    DescriptorChain,
    GuestProtocolError,
    walk_chain,
)
from isovisor.devices.virtio.constants import (
    AVAIL_ALIGN,
    AVAIL_F_NO_INTERRUPT,
    DESC_ALIGN,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    USED_ELEM_SIZE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from isovisor.memory import GuestMemory, GuestMemoryError

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_USED_ELEM = struct.Struct("<II")
_U16_FIELD = struct.Struct("<H")
_FENCE_LOCK = threading.Lock()


def _full_fence() -> None:
    """A full memory barrier (store-load ordering) on x86.

    ORDERING: acquiring an uncontended CPython lock performs an atomic read-modify-write
    (a `lock`-prefixed instruction in sem_trywait / sem_post), which x86 orders against
    every earlier store and later load. Python has no cheaper way to emit an mfence."""
    with _FENCE_LOCK:
        pass


@dataclass
class QueueConfig:
    """One queue as the transport's registers describe it (zero state = after reset)."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc_table: int = 0
    avail_ring: int = 0
    used_ring: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.max_size <= MAX_QUEUE_SIZE or self.max_size & (self.max_size - 1):
            raise ValueError(f"queue max size {self.max_size} is not a power of two <= 32768")
        if self.size == 0:
            self.size = self.max_size

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = self.avail_ring = self.used_ring = 0


def check_layout(mem: GuestMemory, cfg: QueueConfig) -> None:
    """The queue setup checks, run when the driver writes QueueReady = 1.

    GuestProtocolError unless: the size is a power of two no larger than the maximum
    (§2.7, §4.2.2.2), each part is aligned as §2.7's table requires (§2.7.1), and each
    whole part, event-index fields included, lies inside guest RAM (the device reads and
    writes them all: RAM is readable and writable to a device alike)."""
    n = cfg.size
    if n == 0 or n > cfg.max_size or n & (n - 1):
        raise GuestProtocolError(
            f"queue size {n} is not a power of two in 1..{cfg.max_size} (§2.7, §4.2.2.2)"
        )
    parts = (
        ("descriptor table", cfg.desc_table, DESC_ALIGN, desc_table_size(n)),
        ("available ring", cfg.avail_ring, AVAIL_ALIGN, avail_ring_size(n)),
        ("used ring", cfg.used_ring, USED_ALIGN, used_ring_size(n)),
    )
    for name, addr, align, length in parts:
        if addr % align:
            raise GuestProtocolError(f"{name} at {addr:#x} is not {align}-byte aligned (§2.7.1)")
        try:
            mem.check_range(addr, length)
        except GuestMemoryError as exc:
            raise GuestProtocolError(f"{name} ({length} bytes): {exc}") from exc


class Virtqueue:
    """A ready split virtqueue as a device uses it (one I/O thread at a time)."""

    def __init__(
        self,
        mem: GuestMemory,
        cfg: QueueConfig,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        check_layout(mem, cfg)  # the transport checked already; a Virtqueue never trusts it
        self.mem = mem
        self.size = cfg.size
        self.desc_table = cfg.desc_table
        self.avail_ring = cfg.avail_ring
        self.used_ring = cfg.used_ring
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = 0  # free-running u16: the next available-ring slot to consume
        self.next_used = 0  # free-running u16: the used idx the device last published
        self._signalled_used: int | None = None  # next_used at the last notification check
        n = cfg.size
        # memfd offsets of the checked rings (check_layout proved each whole part is RAM)
        self._desc_off = mem.check_range(cfg.desc_table, desc_table_size(n))
        avail = mem.check_range(cfg.avail_ring, avail_ring_size(n))
        used = mem.check_range(cfg.used_ring, used_ring_size(n))
        self._avail_flags_off = avail
        self._avail_idx_off = avail + 2
        self._avail_ring_off = avail + 4
        self._used_event_off = avail + 4 + 2 * n  # §2.7.6: after ring[Queue Size]
        self._used_idx_off = used + 2
        self._used_ring_off = used + 4
        self._avail_event_off = used + 4 + USED_ELEM_SIZE * n  # §2.7.8: after ring[]

    # --- ring fields ------------------------------------------------------------------

    def avail_idx(self) -> int:
        return int(_U16_FIELD.unpack_from(self.mem.ram, self._avail_idx_off)[0])

    def pending(self) -> int:
        """Chains the driver has made available that the device has not popped.

        An index that moved more than Queue Size past the last one consumed is impossible
        for a correct driver (§2.7.6.1: idx never decreases; §2.7.13: the ring cannot
        wrap past the table) and is a GuestProtocolError."""
        n = (self.avail_idx() - self.next_avail) & _U16
        if n > self.size:
            raise GuestProtocolError(
                f"available idx moved {n} entries past the last consumed one "
                f"(queue size {self.size})"
            )
        return n

    # --- device operations -----------------------------------------------------------

    def chain(self, head: int) -> DescriptorChain:
        """The chain at `head` (not yet walked: iterating it validates)."""
        return DescriptorChain(
            self.mem, self.desc_table, self.size, head,
            indirect_allowed=self.indirect, table_offset=self._desc_off,
        )

    def walk(self, head: int) -> tuple[Descriptor, ...]:
        """The chain at `head`, walked and validated (GuestProtocolError otherwise): what
        `chain(head).descriptors()` returns, without the chain object."""
        return walk_chain(
            self.mem, self.desc_table, self.size, head,
            indirect_allowed=self.indirect, table_offset=self._desc_off,
        )

    def pop(self) -> DescriptorChain | None:
        """The next available chain (not yet walked: iterating it validates), or None."""
        if self.pending() == 0:
            return None
        # ORDERING: x86 keeps this load after the avail.idx load above (§2.7.13.3.1).
        slot = self.next_avail % self.size
        ram = self.mem.ram
        head = int(_U16_FIELD.unpack_from(ram, self._avail_ring_off + 2 * slot)[0])
        self.next_avail = (self.next_avail + 1) & _U16
        if self.event_idx:
            # §2.7.10: ask for a notification as soon as anything past what we consumed
            # is added; written before the re-check in enable_notification().
            _U16_FIELD.pack_into(ram, self._avail_event_off, self.next_avail)
        return self.chain(head)

    def pop_heads(self) -> list[int]:
        """The heads of every chain available now, consumed (walk each with `chain`).

        One avail.idx read for the lot (with pending()'s check that it did not jump past
        Queue Size); the heads are plain numbers here, checked when their chain is walked."""
        n = self.pending()
        if n == 0:
            return []
        # ORDERING: x86 keeps these loads after the avail.idx load above (§2.7.13.3.1).
        ram, size = self.mem.ram, self.size
        start = self.next_avail % size
        first = min(n, size - start)
        heads = list(struct.unpack_from(f"<{first}H", ram, self._avail_ring_off + 2 * start))
        if first < n:  # the ring wrapped
            heads += struct.unpack_from(f"<{n - first}H", ram, self._avail_ring_off)
        self.next_avail = (self.next_avail + n) & _U16
        if self.event_idx:
            _U16_FIELD.pack_into(ram, self._avail_event_off, self.next_avail)  # as in pop()
        return heads

    def undo_pop(self, count: int = 1) -> None:
        """Give the last `count` popped chains back (a device that must defer them)."""
        self.next_avail = (self.next_avail - count) & _U16

    def add_used(self, head: int, written: int) -> None:
        """Return chain `head` to the driver, `written` bytes written into it (§2.7.8)."""
        if not 0 <= head < self.size:
            raise GuestProtocolError(f"used id {head} is outside the queue of size {self.size}")
        if not 0 <= written <= _U32:
            raise ValueError(f"used length {written} does not fit 32 bits")
        ram = self.mem.ram
        slot = self.next_used % self.size
        _USED_ELEM.pack_into(ram, self._used_ring_off + USED_ELEM_SIZE * slot, head, written)
        # ORDERING: x86 keeps this store after the element's (§2.7.8.2: len before idx).
        self.next_used = (self.next_used + 1) & _U16
        _U16_FIELD.pack_into(ram, self._used_idx_off, self.next_used)

    def needs_notification(self) -> bool:
        """Whether the used buffers added since the last check warrant an interrupt.

        §2.7.7.2: without EVENT_IDX, notify unless avail.flags has NO_INTERRUPT; with it,
        notify when used idx crossed used_event since the last notification check
        (the vring_need_event test: (new - event - 1) mod 2^16 < (new - old) mod 2^16).
        """
        _full_fence()  # ORDERING: used.idx is visible before the driver's field is read
        new = self.next_used
        if not self.event_idx:
            self._signalled_used = new
            flags: int = _U16_FIELD.unpack_from(self.mem.ram, self._avail_flags_off)[0]
            return not flags & AVAIL_F_NO_INTERRUPT
        old, self._signalled_used = self._signalled_used, new
        if old is None:
            return True
        event: int = _U16_FIELD.unpack_from(self.mem.ram, self._used_event_off)[0]
        return ((new - event - 1) & _U16) < ((new - old) & _U16)

    def enable_notification(self) -> bool:
        """After draining: re-arm available-buffer notifications and report whether more
        chains arrived meanwhile (then the device must keep going, or it might sleep on
        buffers the driver will never notify again)."""
        if self.event_idx:
            _U16_FIELD.pack_into(self.mem.ram, self._avail_event_off, self.next_avail)
        _full_fence()  # ORDERING: avail_event is visible before avail.idx is re-read
        return self.pending() > 0
