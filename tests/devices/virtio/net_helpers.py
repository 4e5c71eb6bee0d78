"""Helpers for the virtio-net tests: a device behind a virtio-mmio transport with both
queues driven by FakeDrivers, on a real TAP in a private network namespace."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from isovisor.devices.events import SecurityEventLog
from isovisor.devices.ratelimit import RateLimiter
from isovisor.devices.tap import Tap
from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.net import RX_QUEUE, TX_QUEUE, NetBackend, VirtioNet
from isovisor.devices.virtio.net_header import F_MAC, F_MRG_RXBUF, HEADER_SIZE, NetHeader
from tests.devices.virtio import OK, FakeDriver, Rig, wait_for
from tests.devices.virtio.netns import ETH_P_TEST, NetNs, eth_frame

N, W = c.DESC_F_NEXT, c.DESC_F_WRITE
MAC = bytes.fromhex("020000000001")
PEER = bytes.fromhex("020000000002")
TX_DESC, TX_AVAIL, TX_USED = 0x40000, 0x50000, 0x60000
RX_BUF = 0x100000  # receive buffers from 1 MiB, 64 KiB apart
TX_BUF = 0x800000  # transmit buffers from 8 MiB, 64 KiB apart
SLOT = 0x10000
BASIC = c.F_VERSION_1 | F_MAC
MERGEABLE = BASIC | F_MRG_RXBUF


class NetRig:
    """VirtioNet on `backend`; `rx` drives queue 0 and `tx` queue 1 (16 entries each)."""

    def __init__(
        self,
        backend: NetBackend,
        *,
        rx_limiter: RateLimiter | None = None,
        tx_limiter: RateLimiter | None = None,
        offloads: bool = True,
    ) -> None:
        self.events = SecurityEventLog()
        self.dev = VirtioNet(self.events, backend, mac=MAC, rx_limiter=rx_limiter,
                             tx_limiter=tx_limiter, offloads=offloads)
        self.rig = Rig(self.dev)
        self.mem = self.rig.mem
        self.rx = self.rig.q
        self.tx = FakeDriver(self.mem, 16, desc=TX_DESC, avail=TX_AVAIL, used=TX_USED)
        self._rx_next = 0  # next receive descriptor / buffer slot

    def up(self, features: int = MERGEABLE) -> None:
        assert self.rig.negotiate(features) & c.STATUS_FEATURES_OK
        self.rig.setup_queue(RX_QUEUE, 16)
        self.rig.setup_queue(TX_QUEUE, 16, desc=TX_DESC, avail=TX_AVAIL, used=TX_USED)
        assert self.rig.status(OK) == OK

    def close(self) -> None:
        self.rig.close()

    def reset(self) -> None:
        """The driver resets the device and starts its rings afresh (call up() next)."""
        self.rig.status(0)
        for drv in (self.rx, self.tx):
            drv.set_avail_idx(0)
            self.mem.write_u16(drv.used + 2, 0)
        self._rx_next = 0

    def notify(self, queue: int) -> None:
        os.eventfd_write(self.rig.t.notify_fds[queue], 1)

    # --- transmit ---------------------------------------------------------------------------

    def send(
        self, frame: bytes, header: NetHeader | None = None, *, slot: int = 0,
        pieces: int = 0, notify: bool = True,
    ) -> int:
        """Publish header + frame as one chain; its head. pieces=0: one descriptor holds
        both (head = slot, 16 slots); pieces=1..3: the header alone, then the frame in
        `pieces` descriptors (descriptors 4*slot.., 4 slots)."""
        base = TX_BUF + slot * SLOT
        data = (header or NetHeader()).pack() + frame
        if pieces == 0:
            self.mem.write_all(base, data)
            self.tx.set_desc(slot, base, len(data))
            head = slot
        else:
            assert 1 <= pieces <= 3 and slot < 4
            head = 4 * slot
            step = -(-len(frame) // pieces)
            parts = [data[:HEADER_SIZE]] + [
                frame[i : i + step] for i in range(0, len(frame), step)
            ]
            addr = base
            for k, part in enumerate(parts):
                self.mem.write_all(addr, part)
                last = k == len(parts) - 1
                self.tx.set_desc(head + k, addr, len(part), 0 if last else N, head + k + 1)
                addr += len(part) + 0x40  # gaps: the pieces are not contiguous
        self.tx.publish(head)
        if notify:
            self.notify(TX_QUEUE)
        return head

    def tx_done(self, count: int, timeout: float = 5.0) -> bool:
        return wait_for(lambda: self.tx.used_idx() == count, timeout)

    # --- receive ----------------------------------------------------------------------------

    def post_rx(self, count: int, size: int = 2048, *, notify: bool = True) -> list[int]:
        """Post `count` one-descriptor writable buffers of `size` bytes; their heads."""
        heads = []
        for _ in range(count):
            h = self._rx_next % 16
            self.rx.writable_chain(h, RX_BUF + h * SLOT, size)
            heads.append(h)
            self._rx_next += 1
        self.rx.publish(*heads)
        if notify:
            self.notify(RX_QUEUE)
        return heads

    def rx_used(self, i: int) -> tuple[int, bytes]:
        """Used element i of the receive queue: (head, the bytes written)."""
        head, length = self.rx.used_elem(i)
        return head, self.mem.read_exact(RX_BUF + head * SLOT, length)

    def rx_packet(self, first: int) -> tuple[NetHeader, bytes, int]:
        """The packet whose first buffer is used element `first`: header, frame, and the
        number of buffers it spans (num_buffers)."""
        _, data = self.rx_used(first)
        hdr = NetHeader.parse(data[:HEADER_SIZE])
        frame = data[HEADER_SIZE:]
        for k in range(1, hdr.num_buffers):
            frame += self.rx_used(first + k)[1]
        return hdr, frame, hdr.num_buffers


class TapPeer:
    """The host end of a TAP in a namespace: an AF_PACKET socket on it."""

    def __init__(self, ns: NetNs, ifname: str) -> None:
        self.sock = ns.packet_socket(ifname)

    def send(self, payload: bytes, dst: bytes = MAC) -> bytes:
        frame = eth_frame(dst, PEER, payload)
        self.sock.send(frame)
        return frame

    def recv_from_guest(self, timeout: float = 5.0) -> bytes:
        """The next test frame the guest sent (the socket also sees our own sends)."""
        end_payload = struct.pack("!H", ETH_P_TEST)
        self.sock.settimeout(timeout)
        while True:
            data, addr = self.sock.recvfrom(70000)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            if data[6:12] == MAC and data[12:14] == end_payload:
                return data

    def close(self) -> None:
        self.sock.close()


@contextmanager
def tap_in_netns(name: str = "isvtap0") -> Iterator[tuple[NetNs, Tap, TapPeer]]:
    """A namespace with TAP `name` (up, no address), the Tap opened, and a peer socket."""
    with NetNs() as ns:
        ns.add_tap(name)
        tap = ns.open_tap(name)
        peer = TapPeer(ns, name)
        try:
            yield ns, tap, peer
        finally:
            peer.close()
            tap.close()
