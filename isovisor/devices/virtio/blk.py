"""virtio-blk, the block device (virtio 1.2 §5.2), over a raw image (blk_disk.Disk).

One request queue of QUEUE_SIZE entries. Each chain is walked and validated by the chain
iterator (a broken chain is a GuestProtocolError: NEEDS_RESET and a security event), then
parsed into an immutable BlkRequest by blk_request (a bad request fails with IOERR or
UNSUPP in its status byte; the device carries on), then carried out with preadv/pwritev
straight between the image and views of guest RAM.

Features offered (§5.2.3): SEG_MAX, BLK_SIZE, FLUSH, and either RO (a read-only disk:
writes, discards and write-zeroes fail with IOERR even when the driver ignores the bit,
and the fd is O_RDONLY) or DISCARD and WRITE_ZEROES. Without FLUSH negotiated the device
is write-through (§5.2.6.2: fdatasync after every write). A rate limiter (bytes of IN/OUT
data and operations) holds a request that finds its buckets empty and serves it when the
tokens are back: never dropped, in order.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from isovisor.devices.diskcrypt.encrypted_disk import EncryptedDisk
from isovisor.devices.events import SecurityEventSink
from isovisor.devices.ratelimit import KEEP, BucketSpec, Keep, RateLimiter
from isovisor.devices.virtio.blk_disk import DIRECT_ALIGN, Disk, DiskSpec
from isovisor.devices.virtio.blk_request import (
    HEADER_SIZE,
    SECTOR_SIZE,
    BlkRequest,
    Limits,
    Rejected,
    RequestType,
    Status,
    frame,
    parse,
    parse_common,
    parse_segments,
    segments_length_ok,
)
from isovisor.devices.virtio.chain import Descriptor
from isovisor.devices.virtio.constants import DEVICE_ID_BLOCK
from isovisor.devices.virtio.device import VirtioDevice
from isovisor.devices.virtio.queue import Virtqueue
from isovisor.memory import GuestMemory

log = logging.getLogger(__name__)
_IN, _OUT = RequestType.IN, RequestType.OUT
_SEGMENTED = frozenset({RequestType.DISCARD, RequestType.WRITE_ZEROES})

# --- feature bits (§5.2.3) ---------------------------------------------------------------
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_GEOMETRY = 1 << 4
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_CONFIG_WCE = 1 << 11
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

QUEUE_SIZE = 256
# §5.2.4 seg_max: data segments per request. Two descriptors go to the header and the
# status, so a request without indirect descriptors still fits the queue.
SEG_MAX = QUEUE_SIZE - 2
# DISCARD is fallocate(PUNCH_HOLE) or nothing: cheap at any size. WRITE_ZEROES may fall
# back to writing zeros: its limits bound that work to 8 x 16 MiB per request.
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB: the granularity hole punching frees space at
MAX_WRITE_ZEROES_SECTORS = 1 << 15  # 16 MiB per segment
MAX_WRITE_ZEROES_SEG = 8

# struct virtio_blk_config (§5.2.4) up to write_zeroes_may_unmap + unused1[3]:
# capacity, size_max, seg_max, geometry (c, h, s), blk_size, topology (4 fields),
# writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, unused1.
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert _CONFIG.size == 60


@dataclass
class BlkStats:
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    get_ids: int = 0
    discards: int = 0
    write_zeroes: int = 0
    bad_requests: int = 0  # completed with IOERR or UNSUPP before any I/O
    no_status: int = 0  # chains with no place for the status byte (completed, 0 bytes)
    io_errors: int = 0  # host I/O failed: IOERR
    throttled: int = 0  # times a request waited for the rate limiter


class VirtioBlk(VirtioDevice):
    device_type = DEVICE_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)
    name = "virtio-blk"

    def __init__(
        self, disk: Disk, events: SecurityEventSink, *, rate_limiter: RateLimiter | None = None
    ) -> None:
        super().__init__(events)
        self.disk = disk
        self.rate_limiter = rate_limiter
        self.blk_stats = BlkStats()
        self._pending: tuple[int, BlkRequest] | None = None  # (head, request) throttled

    # --- negotiation and config (§5.2.3, §5.2.4) ---------------------------------------

    @property
    def readonly(self) -> bool:
        return self.disk.readonly

    def device_features(self) -> int:
        f = F_SEG_MAX | F_BLK_SIZE | F_FLUSH
        return f | (F_RO if self.readonly else F_DISCARD | F_WRITE_ZEROES)

    def config_space(self) -> bytes:
        return _CONFIG.pack(
            self.disk.capacity, 0, SEG_MAX, 0, 0, 0, SECTOR_SIZE,
            0, 0, 0, 0,  # topology: not offered
            0, 0, 1,  # writeback (no CONFIG_WCE), unused0, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, 1,  # may unmap: holes read 0
        )

    @property
    def limits(self) -> Limits:
        return Limits(
            capacity=self.disk.capacity,
            readonly=self.readonly,
            discard=self.negotiated(F_DISCARD),
            write_zeroes=self.negotiated(F_WRITE_ZEROES),
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg=MAX_WRITE_ZEROES_SEG,
        )

    # --- the queue -----------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> bool:
        """Serve every available request (the whole ring per notify: `pop_heads`); the
        base class then sends at most one interrupt for the lot (EVENT_IDX aware)."""
        limits = self.limits
        mem = queue.mem
        stopping = self._stopping.is_set
        limiter = self.rate_limiter
        while not stopping():
            if self._pending is not None:
                batch: list[tuple[int, BlkRequest | None]] = [self._pending]
                self._pending = None
            else:
                heads = queue.pop_heads()
                if not heads:
                    return True
                batch = [(h, None) for h in heads]
            for i, (head, req) in enumerate(batch):
                if stopping():
                    queue.undo_pop(len(batch) - i)
                    return True
                if req is None:
                    descs = queue.walk(head)  # validated; GuestProtocolError propagates
                    req = parse_common(descs, mem.ram, limits)
                    if req is None:  # any other shape, or a request that fails
                        parsed = self._parse(mem, descs, limits)
                        if isinstance(parsed, Rejected):
                            self._reject(mem, queue, head, parsed)
                            continue
                        req = parsed
                if limiter is not None and not limiter.consume(nbytes=_cost(req), nops=1):
                    self._pending = (head, req)
                    queue.undo_pop(len(batch) - i - 1)  # the rest wait in the ring
                    self.blk_stats.throttled += 1
                    return False
                status, written = self._execute(mem, req)
                mem.write_u8(req.status_addr, status)
                queue.add_used(head, written + 1)
        return True

    def _parse(
        self, mem: GuestMemory, descs: tuple[Descriptor, ...], limits: Limits
    ) -> BlkRequest | Rejected:
        """Frame and parse a validated chain: the general path, any shape, any type."""
        f = frame(descs)
        if isinstance(f, Rejected):
            return f
        h = f.header
        ram = mem.ram  # descriptors carry checked offsets: no second check
        header = (
            ram[h[0].offset : h[0].offset + HEADER_SIZE].tobytes() if len(h) == 1
            else b"".join(ram[d.offset : d.offset + d.len] for d in h)
        )
        req = parse(f, header, limits)
        if isinstance(req, Rejected) or req.type not in _SEGMENTED:
            return req
        bad = segments_length_ok(req, limits)
        if bad is not None:
            return bad
        raw = b"".join(ram[d.offset : d.offset + d.len] for d in req.data)
        return parse_segments(req, raw, limits)

    def _reject(self, mem: GuestMemory, queue: Virtqueue, head: int, r: Rejected) -> None:
        log.debug("%s: request failed (%s): %s", self.source, r.status.name, r.reason)
        if r.status_addr is None:
            self.blk_stats.no_status += 1
            queue.add_used(head, 0)
            return
        self.blk_stats.bad_requests += 1
        mem.write_u8(r.status_addr, r.status)
        queue.add_used(head, 1)

    def _execute(self, mem: GuestMemory, req: BlkRequest) -> tuple[Status, int]:
        """Carry out a checked request: (status, data bytes written into the guest)."""
        disk, st, kind = self.disk, self.blk_stats, req.type
        try:
            ram = mem.ram  # the data descriptors carry checked offsets
            if kind is _IN:
                views = [ram[d.offset : d.offset + d.len] for d in req.data]
                try:
                    disk.read_into(views, req.offset, req.length, disk.direct and _aligned(req))
                finally:
                    _release(views)
                st.reads += 1
                st.bytes_read += req.length
                return Status.OK, req.length
            if kind is _OUT:
                views = [ram[d.offset : d.offset + d.len] for d in req.data]
                try:
                    disk.write_from(views, req.offset, req.length, disk.direct and _aligned(req))
                finally:
                    _release(views)
                self._write_through()
                st.writes += 1
                st.bytes_written += req.length
                return Status.OK, 0
            if kind is RequestType.FLUSH:
                disk.flush()
                st.flushes += 1
                return Status.OK, 0
            if kind is RequestType.GET_ID:
                serial = disk.serial[: req.length]
                pos = 0
                for d in req.data:
                    ram[d.offset : d.offset + d.len] = serial[pos : pos + d.len]
                    pos += d.len
                st.get_ids += 1
                return Status.OK, req.length
            for seg in req.segments:
                if kind is RequestType.DISCARD:
                    disk.discard(seg.offset, seg.length)
                else:
                    disk.write_zeroes(seg.offset, seg.length, seg.unmap)
            self._write_through()
            if kind is RequestType.DISCARD:
                st.discards += 1
            else:
                st.write_zeroes += 1
            return Status.OK, 0
        except OSError as exc:
            st.io_errors += 1
            log.warning("%s: %s at sector %d failed: %s", self.source, kind.name, req.sector, exc)
            return Status.IOERR, 0

    def _write_through(self) -> None:
        """§5.2.6.2: a driver that did not negotiate FLUSH gets write-through semantics."""
        if not self.negotiated(F_FLUSH):
            self.disk.flush()

    # --- rate limiting ---------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        pending, limiter = self._pending, self.rate_limiter
        if pending is None:
            return None
        if limiter is None:
            return 0.0
        return limiter.time_until(nbytes=_cost(pending[1]), nops=1)

    def on_reset(self) -> None:
        self._pending = None

    def set_rate_limit(
        self,
        bandwidth: BucketSpec | Keep | None = KEEP,
        ops: BucketSpec | Keep | None = KEEP,
    ) -> None:
        """Change the limits while the VM runs (thread-safe); a throttled request is
        retried at once under the new limits."""
        if self.rate_limiter is None:
            self.rate_limiter = RateLimiter()
        self.rate_limiter.update(bandwidth=bandwidth, ops=ops)
        self.wake()

    def close(self) -> None:
        """Stop the device and close the image (VM teardown, after the transport's close)."""
        self.reset()
        self.disk.close()


def open_disk(
    spec: DiskSpec,
    events: SecurityEventSink,
    rate_limiter: RateLimiter | None = None,
    *,
    fd: int | None = None,
) -> VirtioBlk:
    """Open `spec`'s image and wrap it in a device (DiskError names the path on failure).
    Without `rate_limiter`, the spec's bandwidth and ops limits (if any) make one.
    `fd`: the image already open (the jailed worker's host side opened it as the spec
    says); the device takes it over and the path is not opened."""
    if rate_limiter is None and (spec.bandwidth is not None or spec.ops is not None):
        rate_limiter = RateLimiter(spec.bandwidth, spec.ops)
    kind = Disk if spec.key is None else EncryptedDisk  # issue #9: encrypted at rest
    disk = kind.open(spec) if fd is None else kind.from_fd(fd, spec)
    return VirtioBlk(disk, events, rate_limiter=rate_limiter)


def _cost(req: BlkRequest) -> int:
    """Bandwidth tokens a request takes: its data bytes for IN and OUT, none otherwise."""
    return req.length if req.type is _IN or req.type is _OUT else 0


def _aligned(req: BlkRequest) -> bool:
    """Whether every buffer suits O_DIRECT. Guest RAM is one page-aligned mapping whose
    regions start at page multiples, so a guest address's offset within a page is its
    host address's: checking guest addresses is checking host ones."""
    return all(d.addr % DIRECT_ALIGN == 0 and d.len % DIRECT_ALIGN == 0 for d in req.data)


def _release(views: list[memoryview]) -> None:
    for v in views:
        v.release()
