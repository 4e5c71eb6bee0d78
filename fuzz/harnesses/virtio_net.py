"""virtio-net: transmit headers and frames from the guest, received frames (with TAP
headers) into guest buffers, offload negotiation. Oracle: nothing reaches the TAP that
check_tx would refuse, and no frame outside 14..MAX_FRAME bytes."""

from __future__ import annotations

from collections.abc import Sequence

from fuzz import rig
from fuzz.data import Data
from isovisor.devices.virtio.chain import BadRequest
from isovisor.devices.virtio.net import VirtioNet
from isovisor.devices.virtio.net_header import (
    ETH_HLEN,
    HEADER_SIZE,
    MAX_FRAME,
    NetHeader,
    check_tx,
    feature_problem,
    sanitize_rx,
)

COVERS = ("virtio:virtio-net",)


class FuzzTap:
    name = "fuzz0"
    ufo = True

    def __init__(self, frames: list[bytes]) -> None:
        import os

        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.frames = frames
        self.sent: list[int] = []
        self.offloads = 0

    @property
    def fd(self) -> int:
        return self._fd

    def set_offloads(self, flags: int) -> None:
        self.offloads = flags

    def readv(self, buffers: Sequence[memoryview | bytearray]) -> int | None:
        if not self.frames:
            return None
        frame = self.frames.pop(0)
        pos = 0
        for b in buffers:
            n = min(len(b), len(frame) - pos)
            b[:n] = frame[pos:pos + n]
            pos += n
        return pos

    def writev(self, buffers: Sequence[memoryview | bytes]) -> int:
        n = sum(len(b) for b in buffers)
        self.sent.append(n)
        return n

    def close(self) -> None:
        import os

        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _headers(d: Data) -> None:
    """The header rules on their own (the device checks frame lengths first as well)."""
    features = d.u32()
    if feature_problem(features) is not None:
        features = 0
    hdr = NetHeader.parse(d.take(HEADER_SIZE))
    frame_len = d.u32() % (2 * MAX_FRAME) if d.flag() else d.u8()
    try:
        out = check_tx(hdr, frame_len, features)
    except BadRequest:
        pass
    else:
        assert ETH_HLEN <= frame_len <= MAX_FRAME, f"a {frame_len}-byte frame accepted"
        assert out.num_buffers == 0
    rx = sanitize_rx(hdr, features)
    if rx is not None:
        assert rx.flags & ~3 == 0


def one_input(data: bytes) -> None:
    d = Data(data)
    if d.u8() % 4 == 0:
        _headers(d)
        return
    frames = [d.blob(HEADER_SIZE + MAX_FRAME + 64) for _ in range(d.u8() % 3)]
    tap = FuzzTap(frames)
    dev = VirtioNet(rig.security_events(), tap, mac=b"\x52\x54\x00\x00\x00\x01")
    try:
        rig.drive(dev, d)
    finally:
        tap.close()
    for n in tap.sent:
        frame = n - HEADER_SIZE
        assert ETH_HLEN <= frame <= MAX_FRAME, f"a {frame}-byte frame reached the TAP"
