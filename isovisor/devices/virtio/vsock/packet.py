"""The virtio-vsock packet header (virtio 1.2 §5.10.6), parsed once at the boundary.

Every packet on the rx and tx queues starts with a 44-byte little-endian
`struct virtio_vsock_hdr`:

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len;
    le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;

`parse_tx_header` turns the bytes a driver put on the tx queue into an immutable `Header`
with every field checked, and sorts what is wrong into two kinds:

- `HostilePacket` (a GuestProtocolError: the device goes NEEDS_RESET): things only a broken
  or hostile *driver* can produce, since the guest kernel fills them in, never guest
  userspace: a src_cid other than the configured guest_cid (§5.10.6.4: "The guest_cid
  configuration field MUST be used as the source CID"), reserved upper CID bits set
  (§5.10.6), an unknown op, a `len` longer than the buffer holding it or than the largest
  packet we accept, payload on a control packet, undefined flag bits.
- `Unroutable` (a BadRequest: that packet is answered with RST, the device carries on):
  things guest *userspace* can cause through a well-behaved driver, so they must not cost
  every other guest process its vsock device: a destination other than the host (Linux
  routes every non-local CID through this device) and a socket type other than stream
  (§5.10.6.4: "A VIRTIO_VSOCK_OP_RST reply MUST be sent if a packet is received with an
  unknown type value").
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from isovisor.devices.virtio.chain import BadRequest, GuestProtocolError

_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = _HDR.size  # 44
assert HDR_SIZE == 44

HOST_CID = 2  # §5.10.4: the well-known CID of the host
# §5.10.4: CIDs 0, 1, 2 and 0xffffffff are reserved; the upper 32 bits are reserved, zero.
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFF_FFFE
_U32 = 0xFFFF_FFFF

TYPE_STREAM = 1  # §5.10.6.2 VIRTIO_VSOCK_TYPE_STREAM (SEQPACKET, 2, is never offered)

SHUTDOWN_RCV = 1  # §5.10.6.5 VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE: the peer receives no more
SHUTDOWN_SEND = 2  # §5.10.6.5 VIRTIO_VSOCK_SHUTDOWN_F_SEND: the peer sends no more
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

# The largest payload in one packet, either way. Linux never puts more than
# VIRTIO_VSOCK_MAX_PKT_BUF_SIZE (64 KiB) in one packet; a larger `len` only asks the host
# to copy more guest memory per chain.
MAX_PAYLOAD = 64 * 1024


class Op(enum.IntEnum):
    """§5.10.6: the operation constants (VIRTIO_VSOCK_OP_INVALID, 0, is not one)."""

    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class HostilePacket(GuestProtocolError):  # noqa: N818 - a kind of GuestProtocolError
    """A tx packet header only a broken or hostile driver can produce."""


class Unroutable(BadRequest):
    """A well-formed packet the host cannot serve: answer it with RST (unless it is one)."""

    def __init__(self, header: Header, reason: str) -> None:
        super().__init__(reason)
        self.header = header


@dataclass(frozen=True, slots=True)
class Header:
    """One checked virtio_vsock_hdr. `len` is the payload size that follows it."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: Op
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def encode(self) -> bytes:
        return _HDR.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
            self.type, int(self.op), self.flags, self.buf_alloc, self.fwd_cnt,
        )


@dataclass(frozen=True, slots=True)
class Packet:
    """A parsed tx packet: the header and a copy of its `len` payload bytes."""

    header: Header
    payload: bytes = b""


def parse_tx_header(raw: bytes, *, guest_cid: int, available: int) -> Header:
    """Check the header a driver placed on the tx queue.

    `raw` is the first HDR_SIZE device-readable bytes of the chain (a copy: the guest
    cannot change it under us), `available` how many device-readable bytes follow it.
    Raises HostilePacket or Unroutable (see the module docstring)."""
    if len(raw) != HDR_SIZE:
        raise HostilePacket(f"tx packet of {len(raw)} bytes is shorter than the header")
    src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt = (
        _HDR.unpack(raw)
    )
    if src_cid != guest_cid:
        # §5.10.6.4: the driver MUST use guest_cid as the source: a spoofed source.
        raise HostilePacket(f"tx packet from CID {src_cid}, the guest's CID is {guest_cid}")
    if dst_cid > _U32:
        raise HostilePacket(f"dst_cid {dst_cid:#x} sets reserved upper bits (§5.10.6)")
    try:
        operation = Op(op)
    except ValueError:
        raise HostilePacket(f"unknown op {op} (§5.10.6)") from None
    if length > MAX_PAYLOAD:
        raise HostilePacket(f"len {length} exceeds the {MAX_PAYLOAD}-byte packet limit")
    if length > available:
        # §5.10.6: the buffers may be longer than len, never shorter.
        raise HostilePacket(f"len {length} but only {available} payload bytes in the chain")
    if length and operation is not Op.RW:
        raise HostilePacket(f"{operation.name} packet carries a {length}-byte payload")
    if operation is Op.SHUTDOWN:
        if flags & ~SHUTDOWN_BOTH:
            raise HostilePacket(f"SHUTDOWN flags {flags:#x} set undefined bits (§5.10.6.5)")
    elif flags:
        # Flags are defined for SHUTDOWN and, with SEQPACKET (never offered), RW only.
        raise HostilePacket(f"{operation.name} packet with flags {flags:#x}")
    header = Header(
        src_cid, dst_cid, src_port, dst_port, length, type_, operation, flags, buf_alloc,
        fwd_cnt,
    )
    if type_ != TYPE_STREAM:
        raise Unroutable(header, f"socket type {type_} is not stream (§5.10.6.4)")
    if dst_cid != HOST_CID:
        raise Unroutable(header, f"destination CID {dst_cid} is not the host")
    return header


def host_header(
    op: Op,
    *,
    guest_cid: int,
    local_port: int,
    peer_port: int,
    length: int = 0,
    flags: int = 0,
    buf_alloc: int = 0,
    fwd_cnt: int = 0,
    src_cid: int = HOST_CID,
) -> bytes:
    """The encoded header of a packet the device puts on the rx queue."""
    return _HDR.pack(
        src_cid, guest_cid, local_port, peer_port, length, TYPE_STREAM, int(op), flags,
        buf_alloc & _U32, fwd_cnt & _U32,
    )


def rst_reply(header: Header, guest_cid: int) -> bytes:
    """The RST that answers `header` for which no connection exists (§5.10.6.5), with the
    addresses swapped so the guest finds the socket that sent it."""
    return host_header(
        Op.RST, guest_cid=guest_cid, local_port=header.dst_port, peer_port=header.src_port,
        src_cid=header.dst_cid,
    )
