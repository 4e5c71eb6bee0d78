"""virtio-net headers without I/O: transmit checks (§5.1.6.2.1), receive sanitising
(§5.1.6.4.1), feature dependencies (§5.1.3.1), and a fuzz of the transmit parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.devices.virtio.chain import BadRequest
from isovisor.devices.virtio.net import tun_offloads
from isovisor.devices.virtio.net_header import (
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_ECN,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_GUEST_UFO,
    F_HOST_ECN,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_HOST_UFO,
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    HDR_F_RSC_INFO,
    HEADER_SIZE,
    MAX_FRAME,
    NetHeader,
    check_tx,
    feature_problem,
    sanitize_rx,
)

CSUM = HDR_F_NEEDS_CSUM
TSO = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_HOST_UFO


def test_pack_parse_round_trip() -> None:
    h = NetHeader(1, GSO_TCPV4, 54, 1448, 34, 16, 3)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE == 12
    assert raw == bytes([1, 1, 54, 0, 0xA8, 5, 34, 0, 16, 0, 3, 0])
    assert NetHeader.parse(raw) == h
    with pytest.raises(BadRequest):
        NetHeader.parse(raw[:10])


def test_plain_header_passes_with_num_buffers_zeroed() -> None:
    assert check_tx(NetHeader(num_buffers=9), 60, 0) == NetHeader()


@pytest.mark.parametrize("length", [0, 13, MAX_FRAME + 1])
def test_frame_length_bounds(length: int) -> None:
    with pytest.raises(BadRequest, match="frame of"):
        check_tx(NetHeader(), length, TSO)
    check_tx(NetHeader(), 14, 0)
    check_tx(NetHeader(), MAX_FRAME, 0)


@pytest.mark.parametrize("flags", [HDR_F_DATA_VALID, HDR_F_RSC_INFO, 0x80])
def test_transmit_flags_other_than_needs_csum_are_refused(flags: int) -> None:
    with pytest.raises(BadRequest, match="flags"):
        check_tx(NetHeader(flags=flags), 60, TSO)


def test_needs_csum_requires_the_feature_and_a_field_inside_the_frame() -> None:
    hdr = NetHeader(flags=CSUM, csum_start=34, csum_offset=6)
    with pytest.raises(BadRequest, match="VIRTIO_NET_F_CSUM"):
        check_tx(hdr, 60, 0)
    assert check_tx(hdr, 60, F_CSUM) == hdr
    check_tx(NetHeader(flags=CSUM, csum_start=56, csum_offset=2), 60, F_CSUM)
    with pytest.raises(BadRequest, match="outside"):
        check_tx(NetHeader(flags=CSUM, csum_start=57, csum_offset=2), 60, F_CSUM)
    with pytest.raises(BadRequest, match="outside"):
        check_tx(NetHeader(flags=CSUM, csum_start=0xFFFF, csum_offset=0xFFFF), 60, F_CSUM)


@pytest.mark.parametrize(
    ("gso", "feature"),
    [(GSO_TCPV4, F_HOST_TSO4), (GSO_TCPV6, F_HOST_TSO6), (GSO_UDP, F_HOST_UFO)],
)
def test_gso_needs_its_feature(gso: int, feature: int) -> None:
    hdr = NetHeader(flags=CSUM, gso_type=gso, hdr_len=54, gso_size=1448, csum_start=34,
                    csum_offset=16)
    with pytest.raises(BadRequest, match="not negotiated"):
        check_tx(hdr, 3000, F_CSUM)
    assert check_tx(hdr, 3000, F_CSUM | feature) == hdr


def test_gso_rules() -> None:
    good = NetHeader(flags=CSUM, gso_type=GSO_TCPV4, hdr_len=54, gso_size=1448,
                     csum_start=34, csum_offset=16)
    for bad in (
        NetHeader(gso_type=GSO_TCPV4, gso_size=1448),  # no NEEDS_CSUM
        NetHeader(flags=CSUM, gso_type=GSO_TCPV4, csum_start=34, csum_offset=16),  # size 0
        NetHeader(flags=CSUM, gso_type=GSO_UDP_L4, gso_size=1448),  # USO: never offered
        NetHeader(flags=CSUM, gso_type=0x7F, gso_size=1448),
    ):
        with pytest.raises(BadRequest):
            check_tx(bad, 3000, TSO)
    ecn = NetHeader(flags=CSUM, gso_type=GSO_TCPV4 | GSO_ECN, hdr_len=54, gso_size=1448,
                    csum_start=34, csum_offset=16)
    with pytest.raises(BadRequest, match="ECN"):
        check_tx(ecn, 3000, F_CSUM | F_HOST_TSO4)
    check_tx(ecn, 3000, F_CSUM | F_HOST_TSO4 | F_HOST_ECN)
    with pytest.raises(BadRequest, match="hdr_len"):
        check_tx(NetHeader(flags=CSUM, gso_type=GSO_TCPV4, hdr_len=3001, gso_size=1448,
                           csum_start=34, csum_offset=16), 3000, TSO)
    check_tx(good, 3000, TSO)


def test_receive_header_without_guest_csum_has_zero_flags() -> None:
    assert sanitize_rx(NetHeader(flags=HDR_F_DATA_VALID), 0) == NetHeader()
    assert sanitize_rx(NetHeader(flags=CSUM, csum_start=34, csum_offset=16), 0) is None
    assert sanitize_rx(NetHeader(flags=HDR_F_DATA_VALID | HDR_F_RSC_INFO), F_GUEST_CSUM) == (
        NetHeader(flags=HDR_F_DATA_VALID)
    )


@pytest.mark.parametrize(
    ("gso", "feature"),
    [(GSO_TCPV4, F_GUEST_TSO4), (GSO_TCPV6, F_GUEST_TSO6), (GSO_UDP, F_GUEST_UFO)],
)
def test_receive_gso_only_when_negotiated(gso: int, feature: int) -> None:
    hdr = NetHeader(flags=CSUM, gso_type=gso, gso_size=1448, num_buffers=5)
    assert sanitize_rx(hdr, F_GUEST_CSUM) is None
    assert sanitize_rx(hdr, F_GUEST_CSUM | feature) == NetHeader(
        flags=CSUM, gso_type=gso, gso_size=1448
    )
    ecn = NetHeader(flags=CSUM, gso_type=gso | GSO_ECN, gso_size=1448)
    assert sanitize_rx(ecn, F_GUEST_CSUM | feature) is None
    assert sanitize_rx(ecn, F_GUEST_CSUM | feature | F_GUEST_ECN) == ecn
    assert sanitize_rx(NetHeader(gso_type=GSO_UDP_L4), ~0) is None


def test_feature_dependencies() -> None:
    assert feature_problem(0) is None
    assert feature_problem(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_ECN) is None
    for bad in (F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_UFO, F_GUEST_CSUM | F_GUEST_ECN,
                F_HOST_TSO4, F_HOST_TSO6, F_HOST_UFO, F_CSUM | F_HOST_ECN):
        assert feature_problem(bad) is not None, hex(bad)


def test_tun_offloads_follow_guest_features_only() -> None:
    assert tun_offloads(TSO) == 0  # host-side offloads: the TAP always takes them
    assert tun_offloads(F_GUEST_CSUM) == 0x01
    assert tun_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN |
                        F_GUEST_UFO) == 0x1F


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=12, max_size=12), st.integers(0, 70000), st.integers(0, 2**64 - 1))
def test_transmit_parser_fuzz(raw: bytes, frame_len: int, features: int) -> None:
    """Any header, length and feature set: a checked header or BadRequest, nothing else;
    what passes respects every rule the device relies on."""
    try:
        out = check_tx(NetHeader.parse(raw), frame_len, features)
    except BadRequest:
        return
    assert 14 <= frame_len <= MAX_FRAME and out.num_buffers == 0
    assert out.flags in (0, CSUM)
    if out.flags:
        assert features & F_CSUM and out.csum_start + out.csum_offset + 2 <= frame_len
    if out.gso_type:
        assert out.flags == CSUM and out.gso_size > 0 and out.hdr_len <= frame_len
