"""virtio-blk requests (virtio 1.2 §5.2.6), parsed once into immutable objects.

A request is one descriptor chain laid out as `struct virtio_blk_req`:

    le32 type; le32 reserved; le64 sector;    device-readable header, 16 bytes
    u8 data[];                                 readable (OUT, DISCARD, WRITE_ZEROES)
                                               or writable (IN, GET_ID)
    u8 status;                                 device-writable, the chain's last byte

§2.6.4 (message framing): the driver may split these across descriptors any way it likes,
so the parser treats the readable descriptors as one byte stream (header first, then data)
and the writable ones as another (data, then the status byte, which is therefore the last
byte of the last writable descriptor). Everything is checked here, before any I/O:
lengths (a multiple of 512 for IN/OUT, §5.2.6.1), sector ranges with checked 64-bit
arithmetic (sector * 512 + length must neither overflow a u64 nor pass the capacity), the
segment tables of DISCARD/WRITE_ZEROES against the limits in the config space
(§5.2.6.2), and read-only disks. A request that fails a check becomes a `Rejected`
carrying the status to report; a chain without a place for a status byte is a
`Rejected(status_addr=None)`, completed with nothing written. The parser itself touches
no guest memory: it gets the descriptors and the header bytes and returns plain values.

`parse_common` is the fast path for the shape nearly every request has (header, one data
buffer, status; IN or OUT): it returns exactly what `frame` + `parse` return for such a
request when that is a BlkRequest, and None for everything else, which then takes the
general path (a property test holds the two to that).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from isovisor.devices.virtio.chain import Descriptor

SECTOR_SIZE = 512  # §5.2.6: "sector" always counts 512-byte units
SECTOR_SHIFT = 9
HEADER_SIZE = 16
ID_BYTES = 20  # §5.2.6: VIRTIO_BLK_ID_BYTES
SEGMENT_SIZE = 16  # struct virtio_blk_discard_write_zeroes
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")

# §5.2.6: the segment flags of WRITE_ZEROES; every other bit is reserved.
SEGMENT_F_UNMAP = 1


class RequestType(enum.IntEnum):
    """§5.2.6: the `type` field."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    """§5.2.6: the status byte."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


_TYPES = {t.value: t for t in RequestType}
_HEADER_UNPACK = _HEADER.unpack_from
_IN, _OUT = RequestType.IN, RequestType.OUT
WRITE_TYPES = frozenset({RequestType.OUT, RequestType.DISCARD, RequestType.WRITE_ZEROES})


@dataclass(frozen=True, slots=True)
class Limits:
    """What the device accepts; the same numbers its config space advertises (§5.2.4)."""

    capacity: int  # in 512-byte sectors
    readonly: bool
    discard: bool  # VIRTIO_BLK_F_DISCARD negotiated
    write_zeroes: bool  # VIRTIO_BLK_F_WRITE_ZEROES negotiated
    max_discard_sectors: int
    max_discard_seg: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int


class Segment(NamedTuple):
    """One range of a DISCARD or WRITE_ZEROES request, already bounds-checked."""

    sector: int
    num_sectors: int
    unmap: bool

    @property
    def offset(self) -> int:
        return self.sector << SECTOR_SHIFT

    @property
    def length(self) -> int:
        return self.num_sectors << SECTOR_SHIFT


class BlkRequest(NamedTuple):
    """A request that passed every check: the device only has to carry it out.

    `data` are the guest buffers of the data part, in order (device-writable for IN and
    GET_ID, device-readable for OUT; empty otherwise), already cut at the header and the
    status byte. `offset`/`length` are in bytes on the disk (IN, OUT)."""

    type: RequestType
    sector: int
    data: tuple[Descriptor, ...]
    length: int
    status_addr: int
    segments: tuple[Segment, ...] = ()

    @property
    def offset(self) -> int:
        return self.sector << SECTOR_SHIFT


class Rejected(NamedTuple):
    """A request that fails: write `status` at `status_addr` (if there is one) and complete
    it. `reason` is for logs and statistics, never for the guest."""

    status: Status
    status_addr: int | None
    reason: str


class Framing(NamedTuple):
    """A chain cut into its parts (step one of parsing; needs no header bytes)."""

    header: tuple[Descriptor, ...]  # the readable bytes holding the 16-byte header
    readable_data: tuple[Descriptor, ...]
    writable_data: tuple[Descriptor, ...]
    status_addr: int


def split(descs: Sequence[Descriptor], skip: int, keep: int) -> tuple[Descriptor, ...]:
    """The byte range [skip, skip + keep) of `descs` viewed as one stream, as descriptors
    (the first and last possibly shortened)."""
    out: list[Descriptor] = []
    for d in descs:
        if keep <= 0:
            break
        if skip >= d.len:
            skip -= d.len
            continue
        n = min(d.len - skip, keep)
        out.append(Descriptor(d.addr + skip, n, d.writable, d.offset + skip))
        keep -= n
        skip = 0
    return tuple(out)


def frame(descs: Sequence[Descriptor]) -> Framing | Rejected:
    """Cut a validated chain into header, data and status (§5.2.6, §2.6.4).

    The chain walker already guarantees readable-before-writable (§2.7.4.2)."""
    n = len(descs)
    if n == 3 or n == 2:  # the usual shapes (Linux's): header, [data,] 1-byte status
        h, s = descs[0], descs[-1]
        if h.len == HEADER_SIZE and not h.writable and s.writable and s.len == 1:
            if n == 2:
                return Framing((h,), (), (), s.addr)
            d = descs[1]
            if d.len:
                if d.writable:
                    return Framing((h,), (), (d,), s.addr)
                return Framing((h,), (d,), (), s.addr)
    readable = [d for d in descs if not d.writable]
    writable = [d for d in descs if d.writable]
    wlen = sum(d.len for d in writable)
    if wlen == 0:
        # §5.2.6.1: "The driver MUST ... [have] the status ... device-writable": no place
        # to report anything, so the request completes with nothing written.
        return Rejected(Status.IOERR, None, "no device-writable byte for the status")
    last = writable[-1]
    if last.len == 0:
        writable = [d for d in writable if d.len]
        last = writable[-1]
    status_addr = last.addr + last.len - 1
    rlen = sum(d.len for d in readable)
    if rlen < HEADER_SIZE:
        return Rejected(Status.IOERR, status_addr, f"header has {rlen} readable bytes, not 16")
    return Framing(
        header=split(readable, 0, HEADER_SIZE),
        readable_data=split(readable, HEADER_SIZE, rlen - HEADER_SIZE),
        writable_data=split(writable, 0, wlen - 1),
        status_addr=status_addr,
    )


def _total(descs: Sequence[Descriptor]) -> int:
    return sum(d.len for d in descs)


def _check_range(sector: int, nbytes: int, capacity: int) -> str | None:
    """None if [sector * 512, + nbytes) lies on a disk of `capacity` sectors (u64-checked)."""
    start = sector << SECTOR_SHIFT  # checked: Python ints do not wrap, the bound does
    end = start + nbytes
    if end > U64_MAX:
        return f"sector {sector} + {nbytes} bytes overflows 64 bits"
    if end > capacity * SECTOR_SIZE:
        return f"sector {sector} + {nbytes} bytes passes the end ({capacity} sectors)"
    return None


def _rej(f: Framing, status: Status, reason: str) -> Rejected:
    return Rejected(status, f.status_addr, reason)


def parse(f: Framing, header: bytes, limits: Limits) -> BlkRequest | Rejected:
    """Check a framed request against its header and the device's limits.

    `header` is a private copy of the 16 header bytes (the guest cannot change them
    under the checks); `segments` for DISCARD/WRITE_ZEROES come via parse_segments."""
    rtype, _reserved, sector = _HEADER.unpack(header)
    kind = _TYPES.get(rtype)
    if kind is None:
        return _rej(f, Status.UNSUPP, f"unknown request type {rtype}")
    if kind in WRITE_TYPES and limits.readonly:
        # §5.2.6.2: with VIRTIO_BLK_F_RO offered, writes fail with IOERR and write nothing.
        return _rej(f, Status.IOERR, f"{kind.name} on a read-only disk")
    if kind is _IN or kind is _OUT:
        data = f.writable_data if kind is _IN else f.readable_data
        other = f.readable_data if kind is _IN else f.writable_data
        if other:
            return _rej(f, Status.IOERR, f"{kind.name} with data in the wrong direction")
        length = data[0].len if len(data) == 1 else _total(data)
        if length % SECTOR_SIZE:
            # §5.2.6.1: "The length of data MUST be a multiple of 512 bytes for
            # VIRTIO_BLK_T_IN and VIRTIO_BLK_T_OUT requests."
            return _rej(f, Status.IOERR, f"{kind.name} of {length} bytes (not a multiple of 512)")
        why = _check_range(sector, length, limits.capacity)
        if why is not None:
            return _rej(f, Status.IOERR, why)
        return BlkRequest(kind, sector, data, length, f.status_addr)
    if kind is RequestType.FLUSH:
        if f.readable_data or f.writable_data:
            return _rej(f, Status.IOERR, "FLUSH with a data part")
        return BlkRequest(kind, 0, (), 0, f.status_addr)
    if kind is RequestType.GET_ID:
        if f.readable_data or not f.writable_data:
            return _rej(f, Status.IOERR, "GET_ID without a device-writable data part")
        n = min(_total(f.writable_data), ID_BYTES)
        return BlkRequest(kind, 0, split(f.writable_data, 0, n), n, f.status_addr)
    if (kind is RequestType.DISCARD and limits.discard) or (
        kind is RequestType.WRITE_ZEROES and limits.write_zeroes
    ):
        if f.writable_data:
            return _rej(f, Status.IOERR, f"{kind.name} with device-writable data")
        return BlkRequest(kind, sector, f.readable_data, _total(f.readable_data), f.status_addr)
    return _rej(f, Status.UNSUPP, f"{kind.name} is not supported (or not negotiated)")


def parse_common(
    descs: Sequence[Descriptor], ram: memoryview | bytes | bytearray, limits: Limits
) -> BlkRequest | None:
    """The usual request in one step: three descriptors (16-byte device-readable header,
    non-empty data, 1-byte device-writable status), type IN into writable data or OUT from
    readable data, passing every check `parse` makes. Returns the BlkRequest frame+parse
    would; None when the request has any other shape or fails a check (the general path
    then frames, parses and rejects it). The header is read once from `ram` at its checked
    offset (a private copy: the guest cannot change it under the checks)."""
    if len(descs) != 3:
        return None
    h, d, s = descs
    if h.len != HEADER_SIZE or h.writable or not s.writable or s.len != 1:
        return None
    length = d.len
    if length == 0 or length % SECTOR_SIZE:  # §5.2.6.1
        return None
    rtype, _reserved, sector = _HEADER_UNPACK(ram, h.offset)
    if rtype == 0:  # IN: data is device-writable
        if not d.writable:
            return None
        kind = _IN
    elif rtype == 1:  # OUT: data is device-readable, never on a read-only disk (§5.2.6.2)
        if d.writable or limits.readonly:
            return None
        kind = _OUT
    else:
        return None
    if _check_range(sector, length, limits.capacity) is not None:
        return None
    return BlkRequest(kind, sector, (d,), length, s.addr)


def segments_length_ok(req: BlkRequest, limits: Limits) -> Rejected | None:
    """The size checks of a DISCARD/WRITE_ZEROES data part, before it is read."""
    nseg_max = (
        limits.max_discard_seg if req.type is RequestType.DISCARD else limits.max_write_zeroes_seg
    )
    if req.length == 0 or req.length % SEGMENT_SIZE:
        return Rejected(Status.IOERR, req.status_addr,
                        f"{req.type.name} data of {req.length} bytes is not whole segments")
    if req.length // SEGMENT_SIZE > nseg_max:
        # §5.2.6.2: more segments than max_discard_seg / max_write_zeroes_seg.
        return Rejected(Status.IOERR, req.status_addr,
                        f"{req.length // SEGMENT_SIZE} segments exceed the limit {nseg_max}")
    return None


def parse_segments(req: BlkRequest, raw: bytes, limits: Limits) -> BlkRequest | Rejected:
    """Check the segment table of a DISCARD or WRITE_ZEROES request (§5.2.6.2).

    `raw` is a private copy of the request's data part."""
    discard = req.type is RequestType.DISCARD
    max_sectors = limits.max_discard_sectors if discard else limits.max_write_zeroes_sectors
    segments = []
    for off in range(0, len(raw), SEGMENT_SIZE):
        sector, num, flags = _SEGMENT.unpack_from(raw, off)
        if discard and flags & SEGMENT_F_UNMAP:
            # §5.2.6.2: "the device MUST set the status to VIRTIO_BLK_S_UNSUPP for discard
            # commands if the unmap flag is set".
            return Rejected(Status.UNSUPP, req.status_addr, "DISCARD with the unmap flag")
        if flags & ~SEGMENT_F_UNMAP:
            # §5.2.6.2: reserved flag bits set: UNSUPP.
            return Rejected(Status.UNSUPP, req.status_addr, f"segment flags {flags:#x}")
        if num > max_sectors:
            return Rejected(Status.IOERR, req.status_addr,
                            f"segment of {num} sectors exceeds the limit {max_sectors}")
        why = _check_range(sector, num * SECTOR_SIZE, limits.capacity)
        if why is not None:
            return Rejected(Status.IOERR, req.status_addr, why)
        segments.append(Segment(sector, num, bool(flags & SEGMENT_F_UNMAP)))
    return BlkRequest(req.type, req.sector, req.data, req.length, req.status_addr,
                      tuple(segments))
