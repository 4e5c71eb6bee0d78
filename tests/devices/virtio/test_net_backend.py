"""virtio-net against a scripted backend (a SOCK_SEQPACKET socketpair standing in for the
TAP): headers the kernel would only send with offloads on, and a backend that fails."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator, Sequence

import pytest

from isovisor.devices.virtio.device import DeviceState
from isovisor.devices.virtio.net_header import (
    F_GUEST_CSUM,
    GSO_TCPV4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    NetHeader,
)
from tests.devices.virtio import wait_for
from tests.devices.virtio.net_helpers import MAC, MERGEABLE, PEER, NetRig
from tests.devices.virtio.netns import eth_frame


class FakeTap:
    """The device's end of a socketpair; the test writes header + frame at the other."""

    name = "fake0"
    ufo = False

    def __init__(self) -> None:
        self.ours, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.offload_calls: list[int] = []
        self.fail_reads: int | None = None  # an errno to raise from readv

    @property
    def fd(self) -> int:
        return self.ours.fileno()

    def set_offloads(self, flags: int) -> None:
        self.offload_calls.append(flags)

    def readv(self, buffers: Sequence[memoryview | bytearray]) -> int | None:
        if self.fail_reads is not None:
            raise OSError(self.fail_reads, os.strerror(self.fail_reads))
        try:
            return os.readv(self.fd, buffers)
        except BlockingIOError:
            return None

    def writev(self, buffers: Sequence[memoryview | bytes]) -> int:
        return os.writev(self.fd, buffers)

    def close(self) -> None:
        self.ours.close()
        self.host.close()


@pytest.fixture
def fake() -> Iterator[tuple[NetRig, FakeTap]]:
    tap = FakeTap()
    rig = NetRig(tap)
    yield rig, tap
    rig.close()
    tap.close()


def inject(tap: FakeTap, header: NetHeader, payload: bytes = b"x") -> bytes:
    frame = eth_frame(MAC, PEER, payload)
    tap.host.send(header.pack() + frame)
    return frame


def test_gso_header_not_negotiated_is_dropped(fake: tuple[NetRig, FakeTap]) -> None:
    rig, tap = fake
    rig.up(MERGEABLE)
    rig.post_rx(2)
    inject(tap, NetHeader(flags=HDR_F_NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1448))
    good = inject(tap, NetHeader(), b"good")
    assert wait_for(lambda: rig.rx.used_idx() == 1)
    assert rig.rx_packet(0)[1] == good
    assert rig.dev.net_stats.rx_dropped == 1


def test_data_valid_only_with_guest_csum(fake: tuple[NetRig, FakeTap]) -> None:
    rig, tap = fake
    rig.up(MERGEABLE)
    rig.post_rx(2)
    inject(tap, NetHeader(flags=HDR_F_DATA_VALID))
    assert wait_for(lambda: rig.rx.used_idx() == 1)
    assert rig.rx_packet(0)[0].flags == 0  # §5.1.6.4.1: flags zero without GUEST_CSUM
    rig.reset()
    rig.up(MERGEABLE | F_GUEST_CSUM)
    assert tap.offload_calls[-1] == 0x01  # TUN_F_CSUM
    rig.post_rx(2)
    inject(tap, NetHeader(flags=HDR_F_DATA_VALID, num_buffers=99))
    assert wait_for(lambda: rig.rx.used_idx() == 1)
    hdr = rig.rx_packet(0)[0]
    assert hdr.flags == HDR_F_DATA_VALID and hdr.num_buffers == 1


def test_runt_from_the_backend_is_dropped(fake: tuple[NetRig, FakeTap]) -> None:
    rig, tap = fake
    rig.up(MERGEABLE)
    rig.post_rx(2)
    tap.host.send(NetHeader().pack() + b"short")
    good = inject(tap, NetHeader(), b"after")
    assert wait_for(lambda: rig.rx.used_idx() == 1)
    assert rig.rx_packet(0)[1] == good and rig.dev.net_stats.rx_dropped == 1


def test_failing_backend_stops_receive_without_spinning(fake: tuple[NetRig, FakeTap]) -> None:
    rig, tap = fake
    rig.up(MERGEABLE)
    tap.fail_reads = errno.EBADFD
    rig.post_rx(2)
    inject(tap, NetHeader())
    assert wait_for(lambda: rig.dev.net_stats.backend_errors == 1)
    cpu = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - cpu < 0.1
    assert rig.dev.net_stats.backend_errors == 1  # not retried in a loop
    assert rig.dev.state is DeviceState.ACTIVE  # not the guest's fault: no NEEDS_RESET
    assert rig.events.events() == []
