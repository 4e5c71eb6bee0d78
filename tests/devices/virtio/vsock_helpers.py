"""Helpers for the virtio-vsock tests: a guest side that posts rx buffers, sends tx packets
and reads what the device put in the rx queue; a rig with the device behind a virtio-mmio
transport and its I/O thread; Unix servers in a tmp dir."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.vsock.device import VirtioVsock, open_vsock
from isovisor.devices.virtio.vsock.packet import Op
from isovisor.devices.virtio.vsock.spec import VsockSpec
from tests.devices.virtio import FakeDriver, Rig, wait_for

GUEST_CID = 3
HOST_CID = 2
RX_DESC, RX_AVAIL, RX_USED = 0x10000, 0x11000, 0x12000
TX_DESC, TX_AVAIL, TX_USED = 0x20000, 0x21000, 0x22000
EV_DESC, EV_AVAIL, EV_USED = 0x30000, 0x31000, 0x32000
RX_BUFS = 0x100000
RX_STRIDE = 0x2000
TX_BUFS = 0x200000
TX_STRIDE = 0x20000
QSIZE = 16
RX_BUF_SIZE = 44 + 4096  # what Linux 6.1 posts: header + 4 KiB
_HDR = struct.Struct("<QQIIIHHIII")


def hdr(
    op: int,
    *,
    src_cid: int = GUEST_CID,
    dst_cid: int = HOST_CID,
    src_port: int = 1000,
    dst_port: int = 5000,
    length: int = 0,
    type_: int = 1,
    flags: int = 0,
    buf_alloc: int = 64 * 1024,
    fwd_cnt: int = 0,
) -> bytes:
    return _HDR.pack(
        src_cid, dst_cid, src_port, dst_port, length, type_, int(op), flags, buf_alloc, fwd_cnt
    )


@dataclass(frozen=True)
class Rx:
    """A packet the device put in an rx buffer."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    payload: bytes


class GuestSide:
    """The driver's view of the rx and tx queues (no event buffers needed)."""

    def __init__(self, rig: Rig) -> None:
        self.mem = rig.mem
        for ring in (RX_DESC, TX_DESC, EV_DESC):  # a fresh driver starts with empty rings
            self.mem.fill(ring, 0x3000)
        self.rx = FakeDriver(self.mem, QSIZE, desc=RX_DESC, avail=RX_AVAIL, used=RX_USED)
        self.tx = FakeDriver(self.mem, QSIZE, desc=TX_DESC, avail=TX_AVAIL, used=TX_USED)
        self._rx_slot = 0
        self._tx_slot = 0
        self._rx_seen = 0

    def post_rx(self, n: int = 1, size: int = RX_BUF_SIZE) -> None:
        heads = []
        for _ in range(n):
            slot = self._rx_slot % QSIZE
            self._rx_slot += 1
            self.rx.set_desc(slot, RX_BUFS + slot * RX_STRIDE, size, c.DESC_F_WRITE)
            heads.append(slot)
        self.rx.publish(*heads)

    def send(self, header: bytes, payload: bytes = b"") -> int:
        """One tx packet as one readable descriptor; returns its head."""
        slot = self._tx_slot % QSIZE
        self._tx_slot += 1
        addr = TX_BUFS + slot * TX_STRIDE
        self.mem.write_all(addr, header + payload)
        self.tx.set_desc(slot, addr, len(header) + len(payload))
        self.tx.publish(slot)
        return slot

    def received(self) -> list[Rx]:
        """Packets completed in the rx queue since the last call."""
        out = []
        while self._rx_seen != self.rx.used_idx():
            head, length = self.rx.used_elem(self._rx_seen)
            self._rx_seen = (self._rx_seen + 1) & 0xFFFF
            raw = self.mem.read_exact(RX_BUFS + head * RX_STRIDE, length)
            fields = _HDR.unpack(raw[:44])
            out.append(Rx(*fields, payload=raw[44:]))
        return out


class VsockRig(Rig):
    """The device from open_vsock (listener at tmp/v.sock) behind a transport."""

    def __init__(self, tmp: Path, **kw: int) -> None:
        self.uds = tmp / "v.sock"
        self.vsock: VirtioVsock = open_vsock(VsockSpec(GUEST_CID, self.uds), _Events())
        if kw:
            self.vsock.max_connections = kw["max_connections"]
        super().__init__(self.vsock)
        self.vsock.events = self.events  # one log for transport and device
        self.g = GuestSide(self)
        self.got: list[Rx] = []

    def bring_up(self, features: int = c.F_VERSION_1) -> None:
        assert self.negotiate(features) & c.STATUS_FEATURES_OK
        self.setup_queue(0, QSIZE, desc=RX_DESC, avail=RX_AVAIL, used=RX_USED)
        self.setup_queue(1, QSIZE, desc=TX_DESC, avail=TX_AVAIL, used=TX_USED)
        self.setup_queue(2, QSIZE, desc=EV_DESC, avail=EV_AVAIL, used=EV_USED)
        ok = c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK | c.STATUS_DRIVER_OK
        assert self.status(ok) == ok

    def kick(self, queue: int) -> None:
        os.eventfd_write(self.t.notify_fds[queue], 1)

    def send(self, header: bytes, payload: bytes = b"") -> None:
        self.g.send(header, payload)
        self.kick(1)

    def post_rx(self, n: int = 1, size: int = RX_BUF_SIZE) -> None:
        self.g.post_rx(n, size)
        self.kick(0)

    def wait_rx(self, count: int = 1, timeout: float = 5.0) -> list[Rx]:
        """Wait until `count` more packets arrived; return them."""
        start = len(self.got)

        def more() -> bool:
            self.got.extend(self.g.received())
            return len(self.got) - start >= count

        assert wait_for(more, timeout), f"rx: {self.got[start:]}"
        return self.got[start : start + count]

    def close(self) -> None:
        super().close()
        self.vsock.close()


class _Events:
    def report(self, kind: str, source: str, detail: str) -> None:
        raise AssertionError("replaced by the rig's log")


def unix_server(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    s.settimeout(5)
    return s


def rx_ops(rxs: list[Rx]) -> list[Op]:
    return [Op(r.op) for r in rxs]
