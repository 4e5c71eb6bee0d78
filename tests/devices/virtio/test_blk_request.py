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
    parse_segments,
    segments_length_ok,
    split,
)
from isovisor.devices.virtio.chain import Descriptor

LIMITS = Limits(capacity=2048, readonly=False, discard=True, write_zeroes=True,
                max_discard_sectors=1 << 22, max_discard_seg=32,
                max_write_zeroes_sectors=1 << 15, max_write_zeroes_seg=8)


def hdr(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def test_split_cuts_a_stream() -> None:
    descs = [Descriptor(0x1000, 10, False), Descriptor(0x2000, 10, False)]
    assert split(descs, 5, 10) == (Descriptor(0x1005, 5, False), Descriptor(0x2000, 5, False))
    assert split(descs, 10, 10) == (Descriptor(0x2000, 10, False),)
    assert split(descs, 0, 0) == ()


def test_frame_general_shapes() -> None:
    r, w = False, True
    # header in two pieces, data and status in one writable buffer
    f = frame([Descriptor(0x1000, 8, r), Descriptor(0x2000, 8, r), Descriptor(0x3000, 513, w)])
    assert isinstance(f, Framing)
    assert f.header == (Descriptor(0x1000, 8, r), Descriptor(0x2000, 8, r))
    assert f.writable_data == (Descriptor(0x3000, 512, w),) and f.status_addr == 0x3200
    # header and data in one readable buffer
    f = frame([Descriptor(0x1000, 16 + 512, r), Descriptor(0x3000, 1, w)])
    assert isinstance(f, Framing) and f.readable_data == (Descriptor(0x1010, 512, r),)
    # a zero-length last writable descriptor: the status is in the one before
    f = frame([Descriptor(0x1000, 16, r), Descriptor(0x3000, 1, w), Descriptor(0x4000, 0, w)])
    assert isinstance(f, Framing) and f.status_addr == 0x3000
    assert frame([Descriptor(0x1000, 16, r)]) == Rejected(Status.IOERR, None,
                                                         "no device-writable byte for the status")


def test_parse_in_out_and_bounds() -> None:
    f = frame([Descriptor(0x1000, 16, False), Descriptor(0x2000, 1024, True),
               Descriptor(0x3000, 1, True)])
    assert isinstance(f, Framing)
    req = parse(f, hdr(0, 2046), LIMITS)
    assert isinstance(req, BlkRequest) and req.offset == 2046 * 512 and req.length == 1024
    late = parse(f, hdr(0, 2047), LIMITS)
    assert isinstance(late, Rejected) and late.status is Status.IOERR
    huge = parse(f, hdr(0, U64_MAX), LIMITS)
    assert isinstance(huge, Rejected) and "overflows 64 bits" in huge.reason


descriptor = st.builds(
    Descriptor,
    addr=st.integers(0, 1 << 40),
    len=st.integers(0, 1 << 20) | st.sampled_from([0, 1, 15, 16, 17, 511, 512, 513]),
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
