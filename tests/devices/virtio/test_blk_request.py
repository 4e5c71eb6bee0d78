"""The virtio-blk request parser on its own (sans I/O): framing across descriptors and a
property test that nothing a driver can put in a chain or header gets past the checks."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.devices.virtio.blk_request import (
    HEADER_SIZE,
    U64_MAX,
    BlkRequest,
    Framing,
    Limits,
    Rejected,
    RequestType,
    Status,
    frame,
    parse,
    parse_common,
    parse_segments,
    segments_length_ok,
    split,
)
from isovisor.devices.virtio.chain import Descriptor


def D(addr: int, length: int, writable: bool) -> Descriptor:  # noqa: N802 - reads as the type
    """A checked descriptor in the low RAM region, where the memfd offset is the address."""
    return Descriptor(addr, length, writable, addr)

LIMITS = Limits(capacity=2048, readonly=False, discard=True, write_zeroes=True,
                max_discard_sectors=1 << 22, max_discard_seg=32,
                max_write_zeroes_sectors=1 << 15, max_write_zeroes_seg=8)


def hdr(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def test_split_cuts_a_stream() -> None:
    descs = [D(0x1000, 10, False), D(0x2000, 10, False)]
    assert split(descs, 5, 10) == (D(0x1005, 5, False), D(0x2000, 5, False))
    assert split(descs, 10, 10) == (D(0x2000, 10, False),)
    assert split(descs, 0, 0) == ()


def test_frame_general_shapes() -> None:
    r, w = False, True
    # header in two pieces, data and status in one writable buffer
    f = frame([D(0x1000, 8, r), D(0x2000, 8, r), D(0x3000, 513, w)])
    assert isinstance(f, Framing)
    assert f.header == (D(0x1000, 8, r), D(0x2000, 8, r))
    assert f.writable_data == (D(0x3000, 512, w),) and f.status_addr == 0x3200
    # header and data in one readable buffer
    f = frame([D(0x1000, 16 + 512, r), D(0x3000, 1, w)])
    assert isinstance(f, Framing) and f.readable_data == (D(0x1010, 512, r),)
    # a zero-length last writable descriptor: the status is in the one before
    f = frame([D(0x1000, 16, r), D(0x3000, 1, w), D(0x4000, 0, w)])
    assert isinstance(f, Framing) and f.status_addr == 0x3000
    assert frame([D(0x1000, 16, r)]) == Rejected(Status.IOERR, None,
                                                         "no device-writable byte for the status")


def test_parse_in_out_and_bounds() -> None:
    f = frame([D(0x1000, 16, False), D(0x2000, 1024, True),
               D(0x3000, 1, True)])
    assert isinstance(f, Framing)
    req = parse(f, hdr(0, 2046), LIMITS)
    assert isinstance(req, BlkRequest) and req.offset == 2046 * 512 and req.length == 1024
    late = parse(f, hdr(0, 2047), LIMITS)
    assert isinstance(late, Rejected) and late.status is Status.IOERR
    huge = parse(f, hdr(0, U64_MAX), LIMITS)
    assert isinstance(huge, Rejected) and "overflows 64 bits" in huge.reason


descriptor = st.builds(
    D,
    addr=st.integers(0, 1 << 40),
    length=st.integers(0, 1 << 20) | st.sampled_from([0, 1, 15, 16, 17, 511, 512, 513]),
    writable=st.booleans(),
)
types = st.sampled_from([int(t) for t in RequestType]) | st.integers(0, 0xFFFF_FFFF)
sectors = st.integers(0, U64_MAX) | st.integers(0, 4096) | st.sampled_from([U64_MAX >> 9])


@settings(max_examples=150, deadline=None)
@given(st.lists(descriptor, min_size=1, max_size=6), types, sectors, st.binary(max_size=256))
def test_nothing_unchecked_gets_through(
    descs: list[Descriptor], rtype: int, sector: int, segtable: bytes
) -> None:
    # The chain walker guarantees readable-before-writable; mirror it.
    descs = sorted(descs, key=lambda d: d.writable)
    f = frame(descs)
    if isinstance(f, Rejected):
        return
    req = parse(f, hdr(rtype, sector), LIMITS)
    if isinstance(req, Rejected):
        assert req.status in (Status.IOERR, Status.UNSUPP)
        return
    assert req.status_addr == f.status_addr
    if req.type in (RequestType.IN, RequestType.OUT):
        assert req.length % 512 == 0
        assert req.offset + req.length <= LIMITS.capacity * 512
        assert sum(d.len for d in req.data) == req.length
        assert all(d.writable == (req.type is RequestType.IN) for d in req.data)
    elif req.type is RequestType.GET_ID:
        assert 0 < req.length <= 20
    elif req.type in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
        bad = segments_length_ok(req, LIMITS)
        if bad is not None:
            return
        raw = (segtable * (req.length // max(len(segtable), 1) + 1))[: req.length]
        if len(raw) != req.length:
            return
        done = parse_segments(req, raw, LIMITS)
        if isinstance(done, BlkRequest):
            for s in done.segments:
                assert s.offset + s.length <= LIMITS.capacity * 512
    else:
        assert req.type is RequestType.FLUSH and not req.data
    assert len(hdr(rtype, sector)) == HEADER_SIZE


# --- the fast path -----------------------------------------------------------------------

_RO_LIMITS = Limits(capacity=2048, readonly=True, discard=False, write_zeroes=False,
                    max_discard_sectors=0, max_discard_seg=0,
                    max_write_zeroes_sectors=0, max_write_zeroes_seg=0)
_common_len = st.sampled_from([0, 1, 15, 16, 17, 511, 512, 513, 4096, 65536, 2048 * 512])


@settings(max_examples=400, deadline=None)
@given(
    lens=st.tuples(_common_len, _common_len, _common_len),
    writable=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    extra=st.integers(0, 2),
    rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 99]) | st.integers(0, 0xFFFF_FFFF),
    sector=st.sampled_from([0, 1, 2040, 2047, 2048, U64_MAX >> 9, U64_MAX]) | st.integers(0, 4096),
    readonly=st.booleans(),
)
def test_parse_common_agrees_with_the_general_parser(
    lens: tuple[int, int, int], writable: tuple[bool, bool, bool], extra: int, rtype: int,
    sector: int, readonly: bool,
) -> None:
    """The fast path never admits what frame + parse would not, and when it answers, it
    answers exactly what they would."""
    # Every descriptor lies inside RAM (the chain walker checked it), and whichever one
    # comes first after sorting holds the header.
    ram = bytearray(0x90000 + 512)
    starts = (0x10, 0x1000, 0x80000)
    for start in starts:
        struct.pack_into("<IIQ", ram, start, rtype, 0, sector)
    shapes = [D(start, n, w) for start, n, w in zip(starts, lens, writable, strict=True)]
    shapes += [D(0x90000, 512, True)] * extra
    descs = sorted(shapes, key=lambda d: d.writable)  # as the chain walker guarantees
    limits = _RO_LIMITS if readonly else LIMITS
    fast = parse_common(descs, ram, limits)
    if fast is None:
        return
    f = frame(descs)
    assert isinstance(f, Framing)
    head = descs[0].offset
    general = parse(f, bytes(ram[head:head + 16]), limits)
    assert fast == general


def test_parse_common_takes_the_usual_read_and_write() -> None:
    ram = bytearray(0x100)
    struct.pack_into("<IIQ", ram, 0x10, 0, 0, 8)
    descs = [D(0x10, 16, False), D(0x1000, 4096, True), D(0x2000, 1, True)]
    req = parse_common(descs, ram, LIMITS)
    assert req == BlkRequest(RequestType.IN, 8, (descs[1],), 4096, 0x2000)
    struct.pack_into("<IIQ", ram, 0x10, 1, 0, 2047)
    descs[1] = D(0x1000, 512, False)
    assert parse_common(descs, ram, LIMITS) == BlkRequest(RequestType.OUT, 2047, (descs[1],),
                                                          512, 0x2000)
    assert parse_common(descs, ram, _RO_LIMITS) is None  # a write on a read-only disk
    struct.pack_into("<IIQ", ram, 0x10, 1, 0, 2048)
    assert parse_common(descs, ram, LIMITS) is None  # past the end: the general path fails it
