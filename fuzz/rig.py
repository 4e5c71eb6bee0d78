"""Shared fixtures of the virtio harnesses: guest RAM laid out as a driver would, with the
descriptor table, the available ring and the buffers taken from the fuzz input, and a
device driven through its real queue processing (the I/O thread's loop, minus the thread).

Input layout of one ring (Data):
    u8 qlog, u8 ndesc, ndesc x [u8 sel, addr, len, u8 flags, next], u8 asel, u8 navail,
    navail x entry, blob (buffer bytes at BUF)
where sel bit 7 = raw 64-bit address (else BUF + u32 % BUF_SIZE), bit 6 = raw 32-bit
length (else u16), bit 5 = raw 16-bit next (else u8 % size); asel bit 0 = raw avail idx,
bit 1 = raw ring entries, bit 2 = NO_INTERRUPT."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from fuzz.data import Data, Writer
from isovisor.devices.events import SecurityEventLog
from isovisor.devices.virtio import constants as vc
from isovisor.devices.virtio.chain import GuestProtocolError
from isovisor.devices.virtio.device import DeviceState, VirtioDevice
from isovisor.devices.virtio.queue import QueueConfig, Virtqueue
from isovisor.memory import GuestMemory
from isovisor.memory.layout import MIN_MEMORY

RAM = MIN_MEMORY
QUEUES_BASE = 0x10_0000
QUEUE_STRIDE = 0x4_0000
BUF = 0x80_0000
BUF_SIZE = 0x10_0000
MAX_BLOB = 0x1_0000
_DESC = struct.Struct("<QIHH")

logging.getLogger("isovisor").setLevel(logging.CRITICAL)  # contained faults log loudly


def queue_addrs(k: int) -> tuple[int, int, int]:
    base = QUEUES_BASE + k * QUEUE_STRIDE
    return base, base + 0x1_0000, base + 0x2_0000


_MEM: GuestMemory | None = None


def memory() -> GuestMemory:
    """One guest RAM per process, cleared where the rig writes before each input."""
    global _MEM
    if _MEM is None:
        _MEM = GuestMemory(RAM)
    return _MEM


def clear(mem: GuestMemory, queues: int) -> None:
    mem.fill(QUEUES_BASE, queues * QUEUE_STRIDE)
    mem.fill(BUF, BUF_SIZE)


def load_ring(d: Data, mem: GuestMemory, k: int, max_size: int) -> QueueConfig:
    desc, avail, used = queue_addrs(k)
    size = 1 << (d.u8() % max_size.bit_length())
    for i in range(d.u8() % (size + 1)):
        sel = d.u8()
        addr = d.u64() if sel & 0x80 else BUF + d.u32() % BUF_SIZE
        length = d.u32() if sel & 0x40 else d.u16()
        flags = d.u8() & (vc.DESC_F_NEXT | vc.DESC_F_WRITE | vc.DESC_F_INDIRECT)
        nxt = d.u16() if sel & 0x20 else d.u8() % size
        mem.write_all(desc + i * vc.DESC_SIZE, _DESC.pack(addr % (1 << 64), length, flags, nxt))
    asel = d.u8()
    navail = d.u8() % (size + 1)
    entries = [d.u16() if asel & 2 else d.u8() % size for _ in range(navail)]
    idx = d.u16() if asel & 1 else navail
    mem.write_u16(avail, vc.AVAIL_F_NO_INTERRUPT if asel & 4 else 0)
    mem.write_u16(avail + 2, idx)
    for j, e in enumerate(entries):
        mem.write_u16(avail + 4 + 2 * (j % size), e)
    mem.write_all(BUF, d.blob(MAX_BLOB))
    return QueueConfig(max_size, size=size, desc_table=desc, avail_ring=avail, used_ring=used)


def empty_ring(k: int, max_size: int) -> QueueConfig:
    desc, avail, used = queue_addrs(k)
    return QueueConfig(max_size, size=max_size, desc_table=desc, avail_ring=avail, used_ring=used)


@dataclass
class Desc:
    addr: int  # relative to BUF unless raw
    len: int
    flags: int = 0
    next: int = 0
    raw_addr: bool = False


def ring_seed(w: Writer, size_log: int, descs: Sequence[Desc], heads: Sequence[int],
              blob: bytes) -> Writer:
    """Append one ring in load_ring's layout (heads are avail ring entries)."""
    w.u8(size_log).u8(len(descs))
    for x in descs:
        sel = (0x80 if x.raw_addr else 0) | (0x40 if x.len > 0xFFFF else 0) | 0x20
        w.u8(sel)
        if x.raw_addr:
            w.u64(x.addr)
        else:
            w.u32(x.addr)
        if x.len > 0xFFFF:
            w.u32(x.len)
        else:
            w.u16(x.len)
        w.u8(x.flags).u16(x.next)
    w.u8(2).u8(len(heads))
    for h in heads:
        w.u16(h)
    return w.blob(blob)


class NullInterrupt:
    def __init__(self) -> None:
        self.used = self.config = self.needs_reset = 0

    def signal_used_buffer(self) -> None:
        self.used += 1

    def signal_config_change(self) -> None:
        self.config += 1

    def set_needs_reset(self) -> None:
        self.needs_reset += 1


@dataclass
class Outcome:
    protocol_errors: list[str] = field(default_factory=list)


def negotiate(dev: VirtioDevice, mask: int) -> int:
    f = (dev.avail_features & mask) | vc.F_VERSION_1
    if not dev.features_ok(f):
        f = vc.F_VERSION_1 | (dev.avail_features & (vc.F_INDIRECT_DESC | vc.F_EVENT_IDX) & mask)
    return f


def drive(dev: VirtioDevice, d: Data, rounds: int = 2) -> Outcome:
    """Run `dev`'s queue processing over one fuzzed queue (the others empty), as the I/O
    thread would, without the thread. Only GuestProtocolError may come out (the device
    then goes NEEDS_RESET): anything else propagates, and is a finding."""
    mem = memory()
    n = len(dev.queue_max_sizes)
    clear(mem, n)
    features = negotiate(dev, d.u64())
    target = d.u8() % n
    cfgs = [load_ring(d, mem, k, m) if k == target else empty_ring(k, m)
            for k, m in enumerate(dev.queue_max_sizes)]
    out = Outcome()
    try:
        queues: list[Virtqueue | None] = [
            Virtqueue(mem, c, event_idx=bool(features & vc.F_EVENT_IDX),
                      indirect=bool(features & vc.F_INDIRECT_DESC)) for c in cfgs]
    except GuestProtocolError as exc:
        out.protocol_errors.append(str(exc))
        return out
    dev.acked_features = features
    dev.mem = mem
    dev.queues = tuple(queues)
    dev._interrupt = NullInterrupt()
    dev._state = DeviceState.ACTIVE
    dev._stopping.clear()  # reset() leaves it set; activate() would clear it
    try:
        dev.on_activate()
        for _ in range(rounds):
            for i in (target, *[k for k in range(n) if k != target]):
                dev._process(i)
    except GuestProtocolError as exc:
        out.protocol_errors.append(str(exc))
    finally:
        dev.reset()
    return out


def security_events() -> SecurityEventLog:
    return SecurityEventLog()
