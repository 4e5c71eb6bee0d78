"""virtio-net on a real TAP (in a private network namespace), driven through the virtio-mmio
transport by FakeDrivers: frames both ways, mergeable buffers and the spill path, bad
requests, hostile chains, offloads mirrored to the TAP, flow control without busy loops,
rate limiters, reset."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from isovisor.devices.ratelimit import BucketSpec, RateLimiter
from isovisor.devices.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, Tap
from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.device import DeviceState
from isovisor.devices.virtio.net import RX_QUEUE, TX_QUEUE
from isovisor.devices.virtio.net_header import (
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_ECN,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_HOST_TSO4,
    F_MAC,
    F_MRG_RXBUF,
    F_STATUS,
    GSO_TCPV4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    HEADER_SIZE,
    NetHeader,
)
from tests.devices.virtio import wait_for
from tests.devices.virtio.net_helpers import (
    BASIC,
    MAC,
    MERGEABLE,
    PEER,
    RX_BUF,
    SLOT,
    TX_BUF,
    NetRig,
    TapPeer,
    tap_in_netns,
)
from tests.devices.virtio.netns import ETH_P_TEST, NetNs, eth_frame, namespaces_left

W = c.DESC_F_WRITE


@pytest.fixture
def tap() -> Iterator[tuple[NetNs, Tap, TapPeer]]:
    with tap_in_netns() as t:
        yield t
    assert namespaces_left() == []


@pytest.fixture
def rig(tap: tuple[NetNs, Tap, TapPeer]) -> Iterator[NetRig]:
    r = NetRig(tap[1])
    yield r
    r.close()


def guest_frame(payload: bytes, size: int = 60) -> bytes:
    return eth_frame(b"\xff" * 6, MAC, payload).ljust(size, b"\xa5")


# --- identity ---------------------------------------------------------------------------------


def test_identity_and_config(rig: NetRig) -> None:
    r = rig.rig
    assert r.rd(c.MMIO_DEVICE_ID) == c.DEVICE_ID_NET
    r.wr(c.MMIO_DEVICE_FEATURES_SEL, 0)
    low = r.rd(c.MMIO_DEVICE_FEATURES)
    assert low & (F_MAC | F_STATUS | F_MRG_RXBUF | F_CSUM | F_GUEST_CSUM) == (
        F_MAC | F_STATUS | F_MRG_RXBUF | F_CSUM | F_GUEST_CSUM
    )
    for q in (RX_QUEUE, TX_QUEUE):
        r.wr(c.MMIO_QUEUE_SEL, q)
        assert r.rd(c.MMIO_QUEUE_NUM_MAX) == 256
    r.wr(c.MMIO_QUEUE_SEL, 2)
    assert r.rd(c.MMIO_QUEUE_NUM_MAX) == 0  # no control queue
    config = r.t.read(c.MMIO_CONFIG, 8)
    assert config[:6] == MAC
    assert int.from_bytes(config[6:8], "little") == 1  # VIRTIO_NET_S_LINK_UP


def test_feature_dependencies_are_enforced(rig: NetRig) -> None:
    # §5.1.3.1: GUEST_TSO4 requires GUEST_CSUM, HOST_TSO4 requires CSUM.
    assert not rig.rig.negotiate(BASIC | F_GUEST_TSO4) & c.STATUS_FEATURES_OK
    assert not rig.rig.negotiate(BASIC | F_HOST_TSO4) & c.STATUS_FEATURES_OK
    assert rig.rig.negotiate(BASIC | F_CSUM | F_HOST_TSO4) & c.STATUS_FEATURES_OK


def test_offloads_mirror_the_negotiated_guest_features(rig: NetRig, tap: tuple) -> None:
    t: Tap = tap[1]
    rig.up(MERGEABLE | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN)
    assert t.offloads == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    rig.rig.status(0)  # reset: offloads off again
    assert t.offloads == 0
    rig.up(MERGEABLE | F_CSUM | F_HOST_TSO4)  # host-side offloads need nothing of the TAP
    assert t.offloads == 0


# --- transmit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [0, 1, 3])
def test_transmitted_frame_reaches_the_host(rig: NetRig, tap: tuple, pieces: int) -> None:
    peer: TapPeer = tap[2]
    rig.up()
    frame = guest_frame(b"hello from the guest", 300)
    rig.send(frame, pieces=pieces)
    assert peer.recv_from_guest() == frame
    assert rig.tx_done(1)
    assert rig.tx.used_elem(0) == (0, 0)  # §5.1.6.2: nothing written back
    assert rig.dev.net_stats.tx_frames == 1 and rig.dev.net_stats.tx_bytes == 300


def test_header_is_copied_before_it_is_checked(rig: NetRig, tap: tuple) -> None:
    """The TAP gets the device's copy of the header (num_buffers zeroed), not guest RAM."""
    peer: TapPeer = tap[2]
    rig.up()
    rig.send(guest_frame(b"x"), NetHeader(num_buffers=7), pieces=1)
    assert peer.recv_from_guest()[:6] == b"\xff" * 6
    assert rig.tx_done(1)


@pytest.mark.parametrize(
    ("header", "frame_len", "features"),
    [
        (NetHeader(flags=HDR_F_DATA_VALID), 60, MERGEABLE),  # §5.1.6.2.1 MUST NOT
        (NetHeader(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6), 60, MERGEABLE),
        (NetHeader(flags=HDR_F_NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1448), 2000,
         MERGEABLE | F_CSUM),  # TSO4 not negotiated
        (NetHeader(), 10, MERGEABLE),  # shorter than an Ethernet header
        (NetHeader(), 65551, MERGEABLE),  # longer than 65562 - 12
        (NetHeader(flags=HDR_F_NEEDS_CSUM, csum_start=50, csum_offset=16), 60,
         MERGEABLE | F_CSUM),  # checksum field outside the frame
    ],
    ids=["data-valid", "csum-not-negotiated", "gso-not-negotiated", "runt", "oversized",
         "csum-outside"],
)
def test_bad_transmit_is_dropped_and_the_device_carries_on(
    rig: NetRig, tap: tuple, header: NetHeader, frame_len: int, features: int
) -> None:
    peer: TapPeer = tap[2]
    rig.up(features)
    rig.send(guest_frame(b"bad", frame_len)[:frame_len], header, slot=0)
    assert rig.tx_done(1)
    assert rig.tx.used_elem(0) == (0, 0)
    good = guest_frame(b"good")
    rig.send(good, slot=1)
    assert peer.recv_from_guest() == good
    assert rig.tx_done(2)
    assert rig.dev.net_stats.tx_bad == 1 and rig.dev.net_stats.tx_frames == 1
    assert rig.dev.state is DeviceState.ACTIVE and rig.events.events() == []


def test_writable_descriptor_in_a_transmit_chain_is_a_bad_request(rig: NetRig) -> None:
    rig.up()
    rig.mem.write_all(TX_BUF, NetHeader().pack() + guest_frame(b"w"))
    rig.tx.set_desc(0, TX_BUF, HEADER_SIZE + 60, W)
    rig.tx.publish(0)
    rig.notify(TX_QUEUE)
    assert rig.tx_done(1)
    assert rig.dev.net_stats.tx_bad == 1 and rig.dev.state is DeviceState.ACTIVE


def test_partial_checksum_is_accepted_once_negotiated(rig: NetRig, tap: tuple) -> None:
    peer: TapPeer = tap[2]
    rig.up(MERGEABLE | F_CSUM)
    frame = guest_frame(b"partial", 100)
    rig.send(frame, NetHeader(flags=HDR_F_NEEDS_CSUM, csum_start=40, csum_offset=6))
    assert peer.recv_from_guest()[:40] == frame[:40]
    assert rig.dev.net_stats.tx_bad == 0


# --- receive ----------------------------------------------------------------------------------


def test_host_frame_arrives_in_a_receive_buffer(rig: NetRig, tap: tuple) -> None:
    peer: TapPeer = tap[2]
    rig.up(BASIC)
    rig.post_rx(4)
    sent = peer.send(b"hello guest")
    assert wait_for(lambda: rig.rx.used_idx() >= 1)
    hdr, frame, nbufs = rig.rx_packet(0)
    assert frame == sent
    assert nbufs == 1  # §5.1.6.4.1: 1 without mergeable buffers
    assert hdr.flags == 0 and hdr.gso_type == 0  # no GUEST_CSUM: flags zero
    assert rig.rx.used_elem(0)[1] == HEADER_SIZE + len(sent)
    assert rig.dev.net_stats.rx_frames == 1


def test_mergeable_frame_spreads_over_several_buffers(rig: NetRig, tap: tuple) -> None:
    peer: TapPeer = tap[2]
    rig.up(MERGEABLE)
    rig.post_rx(8, size=256)
    sent = peer.send(bytes(range(256)) * 4)  # a 1038-byte frame: 1050 with the header
    assert wait_for(lambda: rig.rx.used_idx() >= 5)
    _hdr, frame, nbufs = rig.rx_packet(0)
    assert frame == sent and nbufs == 5
    # §5.1.6.4.1: every buffer but the last is used completely.
    assert [rig.rx.used_elem(i)[1] for i in range(5)] == [256, 256, 256, 256, 26]


def test_frame_waits_in_the_spill_buffer_for_more_buffers(rig: NetRig, tap: tuple) -> None:
    peer: TapPeer = tap[2]
    rig.up(MERGEABLE)
    rig.post_rx(2, size=256)
    sent = peer.send(bytes(range(200)) * 5)  # 1014 bytes + 12: five 256-byte buffers
    assert wait_for(lambda: rig.dev.net_stats.rx_spilled == 1)
    time.sleep(0.1)
    assert rig.rx.used_idx() == 0  # held, not published half-done
    assert rig.dev.net_stats.rx_no_buffers >= 1
    rig.post_rx(4, size=256)
    assert wait_for(lambda: rig.rx.used_idx() == 5)
    _, frame, nbufs = rig.rx_packet(0)
    assert frame == sent and nbufs == 5


def test_frame_too_big_for_a_plain_buffer_is_dropped(rig: NetRig, tap: tuple) -> None:
    peer: TapPeer = tap[2]
    rig.up(BASIC)
    rig.post_rx(1, size=200)
    peer.send(bytes(500))
    assert wait_for(lambda: rig.dev.net_stats.rx_dropped == 1)
    small = peer.send(b"small")
    assert wait_for(lambda: rig.rx.used_idx() == 1)
    assert rig.rx_packet(0)[1] == small  # the same buffer took the next frame


def test_no_buffers_pauses_the_tap_without_spinning(rig: NetRig, tap: tuple) -> None:
    peer: TapPeer = tap[2]
    rig.up(MERGEABLE)
    rig.post_rx(1)
    sent = [peer.send(b"frame %d" % i) for i in range(5)]
    assert wait_for(lambda: rig.rx.used_idx() == 1)
    time.sleep(0.1)
    cpu = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu < 0.1  # frames wait in the kernel; the thread sleeps
    assert rig.dev.net_stats.rx_no_buffers >= 1
    rig.post_rx(8)
    assert wait_for(lambda: rig.rx.used_idx() == 5)
    assert [rig.rx_packet(i)[1] for i in range(5)] == sent


def test_bad_receive_buffer_is_returned_empty(rig: NetRig, tap: tuple) -> None:
    peer: TapPeer = tap[2]
    rig.up(MERGEABLE)
    rig.rx.set_desc(0, RX_BUF, 8, W)  # smaller than the header (§5.1.6.3.1)
    rig.rx.set_desc(1, RX_BUF + SLOT, 128)  # device-readable
    rig.rx.writable_chain(2, RX_BUF + 2 * SLOT, 2048)
    rig.rx.publish(0, 1, 2)
    rig.notify(RX_QUEUE)
    sent = peer.send(b"after the bad ones")
    assert wait_for(lambda: rig.rx.used_idx() == 3)
    assert rig.rx.used_elem(0) == (0, 0) and rig.rx.used_elem(1) == (1, 0)
    assert rig.rx_packet(2)[1] == sent
    assert rig.dev.net_stats.rx_bad_buffers == 2 and rig.dev.state is DeviceState.ACTIVE


# --- hostile chains ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue", "detail"), [(TX_QUEUE, "hops"), (RX_QUEUE, "hops"), (TX_QUEUE, "not RAM"),
                          (RX_QUEUE, "not RAM"), (TX_QUEUE, "runs past RAM")],
    ids=["tx-loop", "rx-loop", "tx-outside-ram", "rx-outside-ram", "tx-huge"],
)
def test_hostile_chain_needs_reset_with_a_security_event(
    rig: NetRig, tap: tuple, queue: int, detail: str
) -> None:
    peer: TapPeer = tap[2]
    rig.up()
    drv = rig.tx if queue == TX_QUEUE else rig.rx
    flags = 0 if queue == TX_QUEUE else W
    if detail == "hops":
        drv.set_desc(0, RX_BUF, 64, flags | c.DESC_F_NEXT, 1)
        drv.set_desc(1, RX_BUF, 64, flags | c.DESC_F_NEXT, 0)
    elif detail == "not RAM":
        drv.set_desc(0, 0xE000_0000, 64, flags)
    else:
        drv.set_desc(0, RX_BUF, 0xFFFF_0000, flags | c.DESC_F_NEXT, 1)
        drv.set_desc(1, RX_BUF, 0xFFFF_0000, flags)
    drv.publish(0)
    rig.notify(queue)
    if queue == RX_QUEUE:
        peer.send(b"wake the receive path")
    assert wait_for(lambda: rig.dev.state is DeviceState.BROKEN)
    assert rig.rig.rd(c.MMIO_STATUS) & c.STATUS_DEVICE_NEEDS_RESET
    (ev,) = rig.events.events()
    assert ev.kind == "virtio-needs-reset" and detail in ev.detail
    assert drv.used_idx() == 0
    # The driver's reset brings it back.
    rig.reset()
    rig.up()
    frame = guest_frame(b"after reset")
    rig.send(frame)
    assert peer.recv_from_guest() == frame


# --- rate limiting ----------------------------------------------------------------------------


def test_transmit_rate_limit_defers_frames_without_dropping(tap: tuple) -> None:
    peer: TapPeer = tap[2]
    r = NetRig(tap[1], tx_limiter=RateLimiter(ops=BucketSpec(1, 10.0)))
    try:
        r.up()
        start = time.monotonic()
        for i in range(6):
            r.send(guest_frame(b"rl %d" % i), slot=i, notify=False)
        r.notify(TX_QUEUE)
        got = [peer.recv_from_guest() for _ in range(6)]
        elapsed = time.monotonic() - start
        assert [g[14:18] for g in got] == [b"rl %d" % i for i in range(6)]
        assert elapsed >= 0.45  # 1 at once, then 5 at 10/s
        assert r.tx_done(6) and r.dev.net_stats.tx_throttled >= 1
    finally:
        r.close()


def test_receive_rate_limit_holds_frames_and_runtime_change_releases(tap: tuple) -> None:
    peer: TapPeer = tap[2]
    r = NetRig(tap[1], rx_limiter=RateLimiter(bandwidth=BucketSpec(100, 1.0)))
    try:
        r.up(MERGEABLE)
        r.post_rx(8)
        sent = [peer.send(b"rx %d" % i) for i in range(3)]  # 60 bytes each
        assert wait_for(lambda: r.rx.used_idx() == 1)
        time.sleep(0.3)
        assert r.rx.used_idx() == 1 and r.dev.net_stats.rx_throttled >= 1
        r.dev.set_rate_limit(rx_bandwidth=None)  # lift the limit while running
        assert wait_for(lambda: r.rx.used_idx() == 3)
        assert [r.rx_packet(i)[1] for i in range(3)] == sent
    finally:
        r.close()


# --- reset --------------------------------------------------------------------------------------


def test_reset_and_reactivate(rig: NetRig, tap: tuple) -> None:
    peer: TapPeer = tap[2]
    rig.up(MERGEABLE | F_GUEST_CSUM)
    rig.post_rx(2)
    rig.reset()
    assert rig.dev.state is DeviceState.INACTIVE
    rig.up(MERGEABLE)
    rig.post_rx(2)
    sent = peer.send(b"after reset")
    assert wait_for(lambda: rig.rx.used_idx() == 1)
    assert rig.rx_packet(0)[1] == sent


def test_frame_addressed_elsewhere_is_still_delivered(rig: NetRig, tap: tuple) -> None:
    """The device is not a filter: the TAP decides what reaches it (§5.1.6.5)."""
    peer: TapPeer = tap[2]
    rig.up(BASIC)
    rig.post_rx(1)
    sent = peer.send(b"to someone else", dst=PEER)
    assert wait_for(lambda: rig.rx.used_idx() == 1)
    assert rig.rx_packet(0)[1] == sent
    assert sent[12:14] == ETH_P_TEST.to_bytes(2, "big")


def test_frame_that_cannot_fit_a_whole_ring_is_dropped(rig: NetRig, tap: tuple) -> None:
    """16 buffers of 16 bytes hold 256 bytes: a 1000-byte frame is dropped rather than
    holding every buffer forever; the buffers then serve a frame that fits."""
    peer: TapPeer = tap[2]
    rig.up(MERGEABLE)
    rig.post_rx(16, size=16)
    peer.send(bytes(1000))
    assert wait_for(lambda: rig.dev.net_stats.rx_dropped == 1)
    small = peer.send(b"fits")  # 60 bytes + 12: five 16-byte buffers
    assert wait_for(lambda: rig.rx.used_idx() == 5)
    _, frame, nbufs = rig.rx_packet(0)
    assert frame == small and nbufs == 5
