"""The connections of one vsock device, keyed by (local port, peer port), and what is
waiting for the rx queue.

Guest-initiated: a REQUEST to host port P connects (non-blocking) to the Unix socket
`<uds>_P`; success queues RESPONSE, failure RST (§5.10.6.5: "A VIRTIO_VSOCK_OP_RST reply is
sent if a listening socket does not exist on the destination or the destination has
insufficient resources"). Host-initiated: see listener.py; those get local ports from
LOCAL_PORT_BASE up, like Firecracker.

Bounded resources (§5.10.6.1: extra room outside the rx queue, then stop):
- at most `max_connections` per VM; beyond that a REQUEST gets RST and a host client is
  closed;
- each connection needs at most a few flags of rx work (connection.Pending), and the
  rx-ready set holds each connection once, served round robin;
- RSTs for packets without a connection wait in a queue of MAX_ORPHAN_RSTS; while it is
  full the device stops taking tx packets (`tx_blocked`) until the guest gives rx buffers.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from isovisor.devices.virtio.vsock.connection import Connection
from isovisor.devices.virtio.vsock.listener import Handshake, HostListener
from isovisor.devices.virtio.vsock.packet import (
    MAX_PAYLOAD,
    Header,
    Op,
    Packet,
    Unroutable,
    rst_reply,
)
from isovisor.devices.virtio.vsock.poller import Poller

# How a guest-initiated connection reaches host port P: a connected, non-blocking Unix
# stream socket, or None (no service there: the guest gets RST). The default connects to
# `<uds>_P` itself; a jailed worker, which may not connect(), asks its host side instead.
Connector = Callable[[int], socket.socket | None]

# Connections per VM. With connection.CONN_BUF_SIZE (256 KiB) this caps what one guest can
# make the host hold for slow host sockets at 16 MiB.
MAX_CONNECTIONS = 64
MAX_ORPHAN_RSTS = 64
LOCAL_PORT_BASE = 1 << 30
_U32 = 0xFFFF_FFFF


@dataclass
class VsockStats:
    guest_connects: int = 0  # REQUESTs that reached a host socket
    host_connects: int = 0  # CONNECT lines turned into REQUESTs
    refused: int = 0  # REQUESTs answered RST: no socket at <uds>_P, or too many connections
    unroutable: int = 0  # packets for another CID or socket type (answered RST)
    orphans: int = 0  # RSTs for packets without a connection
    tx_packets: int = 0
    rx_packets: int = 0
    tx_bytes: int = 0  # guest -> host payload
    rx_bytes: int = 0  # host -> guest payload


class Muxer:
    def __init__(
        self,
        guest_cid: int,
        uds: Path | None,
        listener: HostListener | None,
        poller: Poller,
        *,
        stats: VsockStats | None = None,
        max_connections: int = MAX_CONNECTIONS,
        clock: Callable[[], float] = time.monotonic,
        connector: Connector | None = None,
    ) -> None:
        self.guest_cid = guest_cid
        self.uds = uds
        self.connector = connector
        self.listener = listener
        self.poller = poller
        self.stats = stats or VsockStats()
        self.max_connections = max_connections
        self.clock = clock
        self.conns: dict[tuple[int, int], Connection] = {}
        self.rx_ready: dict[tuple[int, int], None] = {}  # insertion-ordered set
        self.orphans: deque[bytes] = deque()
        self._scratch = bytearray(MAX_PAYLOAD)
        self._last_port = LOCAL_PORT_BASE - 1
        if listener is not None:
            listener.start(poller)

    # --- guest packets ---------------------------------------------------------------

    @property
    def tx_blocked(self) -> bool:
        """No room for one more RST answer: stop taking tx packets until rx drains."""
        return len(self.orphans) >= MAX_ORPHAN_RSTS

    def handle_tx(self, pkt: Packet) -> None:
        """A checked guest packet (HostilePacket propagates from a credit overrun)."""
        hdr = pkt.header
        self.stats.tx_packets += 1
        self.stats.tx_bytes += hdr.len
        now = self.clock()
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if conn is None:
            if hdr.op is Op.REQUEST:
                self._connect_guest(hdr, now)
            elif hdr.op is not Op.RST:
                self._orphan_rst(hdr)  # never answer an RST with an RST
            return
        try:
            conn.on_packet(hdr, pkt.payload, now)
        finally:
            self._after(conn)

    def handle_unroutable(self, exc: Unroutable) -> None:
        self.stats.unroutable += 1
        if exc.header.op is not Op.RST:
            self._orphan_rst(exc.header)

    def _orphan_rst(self, hdr: Header) -> None:
        self.stats.orphans += 1
        self.orphans.append(rst_reply(hdr, self.guest_cid))

    def _connect_guest(self, hdr: Header, now: float) -> None:
        if len(self.conns) >= self.max_connections or (
            self.uds is None and self.connector is None
        ):
            self.stats.refused += 1
            self._orphan_rst(hdr)
            return
        sock = (self.connector or self._connect_uds)(hdr.dst_port)
        if sock is None:  # ENOENT, ECONNREFUSED, EAGAIN (backlog full): no service
            self.stats.refused += 1
            self._orphan_rst(hdr)
            return
        conn = Connection(
            sock, guest_cid=self.guest_cid, local_port=hdr.dst_port, peer_port=hdr.src_port,
            poller=self.poller, now=now, host_initiated=False,
            peer_buf_alloc=hdr.buf_alloc, peer_fwd_cnt=hdr.fwd_cnt,
        )
        self.stats.guest_connects += 1
        self.conns[conn.key] = conn
        self._after(conn)

    def _connect_uds(self, port: int) -> socket.socket | None:
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            # The guest chooses only the number: no path of its own reaches the host.
            sock.connect(f"{self.uds}_{port}")
        except OSError:
            sock.close()
            return None
        return sock

    # --- host events -------------------------------------------------------------------

    def on_backend(self) -> None:
        """Handle whatever the poller reports as ready (the I/O thread, on wakeup)."""
        now = self.clock()
        for owner, events in self.poller.poll():
            if isinstance(owner, Connection):
                owner.on_event(events, now)
                self._after(owner)
            elif isinstance(owner, Handshake):
                if self.listener is None or owner.sock.fileno() < 0:
                    continue
                port = self.listener.read_line(owner, self.poller)
                if port is not None:
                    self._connect_host(owner.sock, port, now)
            elif owner is self.listener and self.listener is not None:
                self.listener.accept(self.poller, now)

    def _connect_host(self, sock: socket.socket, port: int, now: float) -> None:
        local = self._alloc_port()
        if local is None or len(self.conns) >= self.max_connections:
            self.stats.refused += 1
            sock.close()
            return
        conn = Connection(
            sock, guest_cid=self.guest_cid, local_port=local, peer_port=port,
            poller=self.poller, now=now, host_initiated=True,
        )
        self.stats.host_connects += 1
        self.conns[conn.key] = conn
        self._after(conn)

    def _alloc_port(self) -> int | None:
        used = {k[0] for k in self.conns}
        for _ in range(len(used) + 1):
            self._last_port = (self._last_port + 1) & _U32
            if self._last_port < LOCAL_PORT_BASE:
                self._last_port = LOCAL_PORT_BASE
            if self._last_port not in used:
                return self._last_port
        return None

    # --- rx side ---------------------------------------------------------------------

    def has_rx(self) -> bool:
        return bool(self.orphans or self.rx_ready)

    def next_rx(self, capacity: int) -> tuple[bytes, bytes | memoryview] | None:
        """The next packet for the guest, payload at most `capacity` bytes: (header,
        payload). The payload view is valid until the next call."""
        if self.orphans:
            self.stats.rx_packets += 1
            return self.orphans.popleft(), b""
        now = self.clock()
        while self.rx_ready:
            key = next(iter(self.rx_ready))
            del self.rx_ready[key]
            conn = self.conns.get(key)
            if conn is None:
                continue
            pkt = conn.next_packet(capacity, self._scratch, now)
            self._after(conn)  # back at the end of the line if it has more: round robin
            if pkt is not None:
                self.stats.rx_packets += 1
                self.stats.rx_bytes += len(pkt[1])
                return pkt
        return None

    # --- bookkeeping -------------------------------------------------------------------

    def _after(self, conn: Connection) -> None:
        if conn.finished:
            if self.conns.get(conn.key) is conn:
                del self.conns[conn.key]
            self.rx_ready.pop(conn.key, None)
            return
        conn.sync()
        if conn.pending:
            self.rx_ready[conn.key] = None

    def next_deadline(self) -> float | None:
        deadlines = [c.deadline for c in self.conns.values() if c.deadline is not None]
        if self.listener is not None and (d := self.listener.next_deadline()) is not None:
            deadlines.append(d)
        return min(deadlines, default=None)

    def expire(self) -> None:
        now = self.clock()
        if self.listener is not None:
            self.listener.expire(self.poller, now)
        for conn in list(self.conns.values()):
            conn.expire(now)
            self._after(conn)

    def close(self) -> None:
        """Close every connection and pending handshake, silently (device reset)."""
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        self.rx_ready.clear()
        self.orphans.clear()
        if self.listener is not None:
            self.listener.stop(self.poller)
