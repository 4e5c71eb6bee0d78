"""virtio-vsock: tx packets (headers, credit, connection state machine) and rx/event
queues, with no host sockets behind it (every guest connection is refused with RST)."""

from __future__ import annotations

from fuzz import rig
from fuzz.data import Data
from isovisor.devices.virtio.vsock.device import VirtioVsock
from isovisor.devices.virtio.vsock.packet import (
    HDR_SIZE,
    MAX_PAYLOAD,
    HostilePacket,
    Unroutable,
    parse_tx_header,
)

COVERS = ("virtio:virtio-vsock",)
CID = 3


def one_input(data: bytes) -> None:
    d = Data(data)
    if d.u8() % 4 == 0:
        available = d.u32() % (MAX_PAYLOAD * 2)
        try:
            h = parse_tx_header(d.take(HDR_SIZE), guest_cid=CID, available=available)
        except (HostilePacket, Unroutable):
            return
        assert h.len <= MAX_PAYLOAD and h.len <= available, f"len {h.len} accepted"
        assert h.src_cid == CID
        return
    rig.drive(VirtioVsock(rig.security_events(), cid=CID), d, rounds=3)
