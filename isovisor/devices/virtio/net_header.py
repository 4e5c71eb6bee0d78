"""virtio-net feature bits and the packet header, without any I/O (virtio 1.2 §5.1).

`NetHeader` is struct virtio_net_hdr as a VERSION_1 device sees it (§5.1.6: 12 bytes, the
num_buffers field always present). Parsing is pure: `check_tx` decides whether a header the
driver wrote is acceptable for the features it negotiated (§5.1.6.2.1), `sanitize_rx`
whether a header the host's TAP wrote may be shown to the driver (§5.1.6.4.1), and
`feature_problem` checks the feature dependencies of §5.1.3.1. The device (net.py) parses
headers from copies, never from guest memory the driver can still change.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from isovisor.devices.virtio.chain import BadRequest

# --- Feature bits (§5.1.3) -------------------------------------------------------------------
F_CSUM = 1 << 0  # device handles packets with partial checksum (driver -> device)
F_GUEST_CSUM = 1 << 1  # driver handles packets with partial checksum (device -> driver)
F_MTU = 1 << 3
F_MAC = 1 << 5  # device has a MAC address in config
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_GUEST_UFO = 1 << 10
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_HOST_UFO = 1 << 14
F_MRG_RXBUF = 1 << 15  # mergeable receive buffers
F_STATUS = 1 << 16  # link status in config
F_CTRL_VQ = 1 << 17

GUEST_GSO = F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_UFO
HOST_GSO = F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_UFO

# §5.1.3.1: "MUST NOT accept a feature which requires another feature which was not
# accepted". Each feature -> the features of which at least one must be there too.
FEATURE_REQUIRES: dict[int, int] = {
    F_GUEST_TSO4: F_GUEST_CSUM,
    F_GUEST_TSO6: F_GUEST_CSUM,
    F_GUEST_ECN: F_GUEST_TSO4 | F_GUEST_TSO6,
    F_GUEST_UFO: F_GUEST_CSUM,
    F_HOST_TSO4: F_CSUM,
    F_HOST_TSO6: F_CSUM,
    F_HOST_ECN: F_HOST_TSO4 | F_HOST_TSO6,
    F_HOST_UFO: F_CSUM,
}

# --- Config space (§5.1.4) ---------------------------------------------------------------------
S_LINK_UP = 1  # virtio_net_config.status

# --- struct virtio_net_hdr (§5.1.6) ------------------------------------------------------------
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

_HDR = struct.Struct("<BBHHHHH")
HEADER_SIZE = _HDR.size  # 12: VERSION_1 always has num_buffers (§5.1.6)
assert HEADER_SIZE == 12

ETH_HLEN = 14  # a frame shorter than an Ethernet header is not a frame
# §5.1.6.3.1: with guest GSO a receive buffer of 65562 bytes holds any packet, header
# included: so no frame is longer than 65562 - 12. The same bound holds for transmit.
MAX_FRAME = 65562 - HEADER_SIZE
# §5.1.6.3.1 without GSO: 1526-byte buffers; Linux sizes them for a VLAN tag too (1518).
MAX_PLAIN_FRAME = 1518

# gso_type (without the ECN bit) -> the feature that allows it, in each direction.
_TX_GSO = {GSO_TCPV4: F_HOST_TSO4, GSO_TCPV6: F_HOST_TSO6, GSO_UDP: F_HOST_UFO}
_RX_GSO = {GSO_TCPV4: F_GUEST_TSO4, GSO_TCPV6: F_GUEST_TSO6, GSO_UDP: F_GUEST_UFO}


@dataclass(frozen=True, slots=True)
class NetHeader:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview) -> NetHeader:
        if len(raw) != HEADER_SIZE:
            raise BadRequest(f"virtio-net header of {len(raw)} bytes (expected {HEADER_SIZE})")
        return cls(*_HDR.unpack(raw))

    def pack(self) -> bytes:
        return _HDR.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
            self.csum_offset, self.num_buffers,
        )

    @property
    def gso(self) -> int:
        return self.gso_type & ~GSO_ECN


def feature_problem(features: int) -> str | None:
    """Why a negotiated feature set breaks §5.1.3.1's dependencies, or None if it is fine."""
    for feature, needs in FEATURE_REQUIRES.items():
        if features & feature and not features & needs:
            return f"feature bit {feature.bit_length() - 1} without bit(s) {needs:#x} (§5.1.3.1)"
    return None


def check_tx(hdr: NetHeader, frame_len: int, features: int) -> NetHeader:
    """Validate a transmit header against the negotiated features (§5.1.6.2.1) and the
    frame it precedes; return the header to hand the TAP (num_buffers zeroed).
    BadRequest if the driver broke a rule: that packet is dropped, the device carries on."""
    if not ETH_HLEN <= frame_len <= MAX_FRAME:
        raise BadRequest(f"frame of {frame_len} bytes (allowed {ETH_HLEN}..{MAX_FRAME})")
    if hdr.flags & ~HDR_F_NEEDS_CSUM:
        # "The driver MUST NOT set the VIRTIO_NET_HDR_F_DATA_VALID and
        # VIRTIO_NET_HDR_F_RSC_INFO bits in flags" (and nothing else is defined).
        raise BadRequest(f"transmit header flags {hdr.flags:#x}")
    if hdr.flags & HDR_F_NEEDS_CSUM:
        if not features & F_CSUM:
            # "If VIRTIO_NET_F_CSUM is not negotiated, the driver MUST set flags to zero".
            raise BadRequest("NEEDS_CSUM without VIRTIO_NET_F_CSUM")
        if hdr.csum_start + hdr.csum_offset + 2 > frame_len:
            raise BadRequest(
                f"checksum at {hdr.csum_start}+{hdr.csum_offset} lies outside a frame of "
                f"{frame_len} bytes"
            )
    if hdr.gso_type == GSO_NONE:
        return replace(hdr, num_buffers=0)
    needed = _TX_GSO.get(hdr.gso)
    if needed is None or not features & needed:
        # "If none of the VIRTIO_NET_F_HOST_TSO4, TSO6, UFO [...] options have been
        # negotiated, the driver MUST set gso_type to VIRTIO_NET_HDR_GSO_NONE."
        raise BadRequest(f"gso_type {hdr.gso_type:#x} not negotiated")
    if hdr.gso_type & GSO_ECN and not features & F_HOST_ECN:
        raise BadRequest("GSO_ECN without VIRTIO_NET_F_HOST_ECN")
    if not hdr.flags & HDR_F_NEEDS_CSUM or hdr.gso_size == 0:
        # "If gso_type differs from VIRTIO_NET_HDR_GSO_NONE, then the driver MUST also set
        # the VIRTIO_NET_HDR_F_NEEDS_CSUM bit in flags and MUST set gso_size".
        raise BadRequest("GSO packet without NEEDS_CSUM or gso_size")
    if hdr.hdr_len > frame_len:
        raise BadRequest(f"hdr_len {hdr.hdr_len} exceeds the frame ({frame_len} bytes)")
    return replace(hdr, num_buffers=0)


def sanitize_rx(hdr: NetHeader, features: int) -> NetHeader | None:
    """The header to give the driver for a packet the TAP delivered, or None if the packet
    must be dropped because the driver did not negotiate what it needs (§5.1.6.4.1)."""
    gso = hdr.gso
    if gso != GSO_NONE:
        needed = _RX_GSO.get(gso)
        if needed is None or not features & needed:
            return None  # "the device MUST NOT set gso_type to ..." unless negotiated
        if hdr.gso_type & GSO_ECN and not features & F_GUEST_ECN:
            return None
    if not features & F_GUEST_CSUM:
        if hdr.flags & HDR_F_NEEDS_CSUM:
            return None  # a partial checksum the driver cannot complete
        # "If VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set flags to zero"
        # (the TAP reports DATA_VALID whatever its offloads).
        return replace(hdr, flags=0, num_buffers=0)
    return replace(hdr, flags=hdr.flags & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID), num_buffers=0)
