"""The virtio_vsock_hdr parser: every field rule, which errors are hostile (the driver)
and which only unroutable (guest userspace can cause them), and the host-side encoders."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.devices.virtio.chain import BadRequest, GuestProtocolError
from isovisor.devices.virtio.vsock.packet import (
    HDR_SIZE,
    MAX_PAYLOAD,
    SHUTDOWN_BOTH,
    Header,
    HostilePacket,
    Op,
    Unroutable,
    host_header,
    parse_tx_header,
    rst_reply,
)
from tests.devices.virtio.vsock_helpers import GUEST_CID, hdr


def parse(raw: bytes, available: int = 0) -> Header:
    return parse_tx_header(raw, guest_cid=GUEST_CID, available=available)


def test_layout_is_44_packed_little_endian_bytes() -> None:
    assert HDR_SIZE == 44
    raw = hdr(Op.RW, src_port=0x1122, dst_port=0x3344, length=5, buf_alloc=7, fwd_cnt=9)
    h = parse(raw, 5)
    assert h == Header(GUEST_CID, 2, 0x1122, 0x3344, 5, 1, Op.RW, 0, 7, 9)
    assert h.encode() == raw


def test_header_is_immutable() -> None:
    h = parse(hdr(Op.REQUEST))
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.len = 5  # type: ignore[misc]


@pytest.mark.parametrize("op", list(Op))
def test_every_op_is_known(op: Op) -> None:
    flags = SHUTDOWN_BOTH if op is Op.SHUTDOWN else 0
    length = 3 if op is Op.RW else 0
    assert parse(hdr(op, flags=flags, length=length), 3).op is op


@pytest.mark.parametrize(
    ("raw", "available", "match"),
    [
        (hdr(Op.REQUEST, src_cid=4), 0, "guest's CID is 3"),  # spoofed source
        (hdr(Op.REQUEST, src_cid=(1 << 32) | 3), 0, "guest's CID"),
        (hdr(Op.REQUEST, src_cid=2), 0, "from CID 2"),  # pretending to be the host
        (hdr(Op.REQUEST, dst_cid=(1 << 40) | 2), 0, "reserved upper bits"),
        (hdr(0), 0, "unknown op 0"),  # VIRTIO_VSOCK_OP_INVALID
        (hdr(8), 0, "unknown op 8"),
        (hdr(0xFFFF), 0, "unknown op 65535"),
        (hdr(Op.RW, length=10), 9, "len 10 but only 9"),  # len past the buffer
        (hdr(Op.RW, length=MAX_PAYLOAD + 1), 1 << 20, "exceeds"),  # huge len
        (hdr(Op.RW, length=0xFFFF_FFFF), 0, "exceeds"),
        (hdr(Op.RESPONSE, length=1), 1, "RESPONSE packet carries"),
        (hdr(Op.SHUTDOWN, flags=4), 0, "undefined bits"),
        (hdr(Op.SHUTDOWN, flags=0x8000_0001), 0, "undefined bits"),
        (hdr(Op.RW, flags=1), 0, "RW packet with flags"),  # SEQ_EOM without SEQPACKET
        (hdr(Op.REQUEST)[:43], 0, "shorter than the header"),
    ],
)
def test_hostile_headers(raw: bytes, available: int, match: str) -> None:
    with pytest.raises(HostilePacket, match=match) as info:
        parse(raw, available)
    assert isinstance(info.value, GuestProtocolError)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (hdr(Op.REQUEST, dst_cid=3), "destination CID 3"),  # itself
        (hdr(Op.REQUEST, dst_cid=0), "destination CID 0"),  # the hypervisor CID
        (hdr(Op.REQUEST, dst_cid=0xFFFF_FFFF), "destination CID"),
        (hdr(Op.REQUEST, type_=2), "socket type 2"),  # SEQPACKET (not offered)
        (hdr(Op.REQUEST, type_=0), "socket type 0"),
    ],
)
def test_unroutable_headers(raw: bytes, match: str) -> None:
    with pytest.raises(Unroutable, match=match) as info:
        parse(raw)
    assert isinstance(info.value, BadRequest)
    assert not isinstance(info.value, GuestProtocolError)
    assert info.value.header.op is Op.REQUEST  # parsed: the RST can answer it


def test_buffers_may_be_longer_than_len() -> None:
    # §5.10.6: only the first len bytes of a longer buffer are payload
    assert parse(hdr(Op.RW, length=4), 4096).len == 4
    assert parse(hdr(Op.RW, length=MAX_PAYLOAD), MAX_PAYLOAD).len == MAX_PAYLOAD


def test_credit_fields_take_any_u32() -> None:
    h = parse(hdr(Op.CREDIT_UPDATE, buf_alloc=0xFFFF_FFFF, fwd_cnt=0xFFFF_FFFF))
    assert (h.buf_alloc, h.fwd_cnt) == (0xFFFF_FFFF, 0xFFFF_FFFF)


def test_host_header_and_rst_reply() -> None:
    raw = host_header(
        Op.RW, guest_cid=GUEST_CID, local_port=5, peer_port=6, length=3, buf_alloc=1 << 33,
        fwd_cnt=-1,
    )
    fields = struct.unpack("<QQIIIHHIII", raw)
    assert fields == (2, GUEST_CID, 5, 6, 3, 1, 5, 0, 0, 0xFFFF_FFFF)  # counters are u32
    with pytest.raises(Unroutable) as info:
        parse(hdr(Op.REQUEST, src_port=1000, dst_port=77, dst_cid=9))
    rst = struct.unpack("<QQIIIHHIII", rst_reply(info.value.header, GUEST_CID))
    assert rst[:7] == (9, GUEST_CID, 77, 1000, 0, 1, int(Op.RST))


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(min_size=0, max_size=50), available=st.integers(0, 1 << 20))
def test_any_bytes_parse_or_fail_as_hostile_or_unroutable(raw: bytes, available: int) -> None:
    try:
        h = parse(raw, available)
    except (HostilePacket, Unroutable):
        return
    assert h.src_cid == GUEST_CID and h.dst_cid == 2 and h.type == 1
    assert h.len <= min(available, MAX_PAYLOAD)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(list(Op)), src_port=st.integers(0, 0xFFFF_FFFF),
    dst_port=st.integers(0, 0xFFFF_FFFF), buf_alloc=st.integers(0, 0xFFFF_FFFF),
)
def test_valid_headers_round_trip(op: Op, src_port: int, dst_port: int, buf_alloc: int) -> None:
    raw = hdr(op, src_port=src_port, dst_port=dst_port, buf_alloc=buf_alloc)
    assert parse(raw).encode() == raw
