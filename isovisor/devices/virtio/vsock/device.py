"""virtio-vsock (virtio 1.2 §5.10), hybrid style: guest sockets meet host Unix sockets.

Queues (§5.10.2): 0 rx (device-writable buffers the device fills with packets for the
guest), 1 tx (device-readable packets from the guest), 2 event. Configuration (§5.10.4):
`le64 guest_cid`. Feature bits (§5.10.3): VIRTIO_VSOCK_F_STREAM only; SEQPACKET is not
offered, so stream is the one socket type.

On the host (see docs/VSOCK.md): a guest connection to host port P is a connection to the
Unix socket `<uds>_P`; a host client connecting to `<uds>` writes `CONNECT <guest port>\\n`
and reads `OK <host port>\\n` once the guest accepted.

The I/O thread moves work both ways in `_pump`: tx packets into the muxer, then what the
muxer has for the guest into rx buffers, until neither moves (bounded rounds; more work is
resumed through `wake`). Host sockets are read only into an rx buffer in hand and only as
far as the guest's credit goes, so nothing the host sends is buffered here; what the guest
sends is held up to the credit we advertised (connection.CONN_BUF_SIZE). The event queue's
buffers are kept: no TRANSPORT_RESET is ever needed (nothing migrates).

Checks: rx chains must be device-writable only and hold at least a header, tx chains
device-readable only and hold the header plus `len` (§5.10.6.4: "Virtqueue buffers for
outgoing packets are read-only. Virtqueue buffers for incoming packets are write-only");
anything else, like every header rule in packet.py, is a GuestProtocolError.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from isovisor.devices.events import SecurityEventSink
from isovisor.devices.virtio.chain import DescriptorChain, GuestProtocolError
from isovisor.devices.virtio.constants import DEVICE_ID_VSOCK
from isovisor.devices.virtio.device import VirtioDevice
from isovisor.devices.virtio.queue import Virtqueue
from isovisor.devices.virtio.vsock.listener import HostListener, bind_listener
from isovisor.devices.virtio.vsock.muxer import MAX_CONNECTIONS, Connector, Muxer, VsockStats
from isovisor.devices.virtio.vsock.packet import (
    HDR_SIZE,
    MAX_GUEST_CID,
    MAX_PAYLOAD,
    MIN_GUEST_CID,
    Packet,
    Unroutable,
    parse_tx_header,
)
from isovisor.devices.virtio.vsock.poller import Poller
from isovisor.devices.virtio.vsock.spec import VsockConfigError, VsockSpec, check_spec

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
QUEUE_SIZE = 256
F_STREAM = 1 << 0  # §5.10.3 VIRTIO_VSOCK_F_STREAM
# Rounds of (tx, rx) per wakeup: bounded work before the I/O thread looks at its stop fd.
MAX_ROUNDS = 8


class VirtioVsock(VirtioDevice):
    device_type = DEVICE_ID_VSOCK
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-vsock"

    def __init__(
        self,
        events: SecurityEventSink,
        *,
        cid: int,
        uds: Path | None = None,
        listener: HostListener | None = None,
        max_connections: int = MAX_CONNECTIONS,
        connector: Connector | None = None,
    ) -> None:
        """`uds`: guest connections to port P go to `<uds>_P` (None: all refused);
        `listener`: host-initiated connections (open_vsock binds it at `uds`);
        `connector`: makes guest connections instead of connecting to `<uds>_P` here."""
        super().__init__(events)
        if not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
            raise ValueError(f"vsock CID {cid} is reserved (§5.10.4)")
        self.cid = cid
        self.uds = uds
        self.listener = listener
        self.max_connections = max_connections
        self.connector = connector
        self.vsock_stats = VsockStats()
        self.muxer: Muxer | None = None
        self._poller: Poller | None = None
        self._tx_blocked = False

    # --- VirtioDevice ---------------------------------------------------------------

    def device_features(self) -> int:
        return F_STREAM

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.cid)  # §5.10.4 struct virtio_vsock_config

    def on_activate(self) -> None:
        poller = self._poller = Poller()
        self.muxer = Muxer(
            self.cid, self.uds, self.listener, poller,
            stats=self.vsock_stats, max_connections=self.max_connections,
            connector=self.connector,
        )
        self._tx_blocked = False
        self.watch_fd(poller.fileno(), self._on_backend)

    def on_reset(self) -> None:
        # §2.4: after reset the device forgets every connection; host sockets are closed.
        if self.muxer is not None:
            self.muxer.close()
            self.muxer = None
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        self._tx_blocked = False

    def process_queue(self, index: int, queue: Virtqueue) -> bool:
        if index == EVENT_QUEUE:
            return False  # keep the buffers for events (§5.10.6.7); none to send
        return self._pump(index)

    def next_wakeup(self) -> float | None:
        m = self.muxer
        if m is None:
            return None
        deadline = m.next_deadline()
        return None if deadline is None else deadline - m.clock()

    def on_timer(self) -> None:
        if self.muxer is not None:
            self.muxer.expire()
        self._pump(None)

    def close(self) -> None:
        """VM teardown, after the transport is closed: remove the listening socket."""
        if self.listener is not None:
            self.listener.close()

    # --- the I/O thread ----------------------------------------------------------------

    def _on_backend(self) -> None:
        if self.muxer is not None:
            self.muxer.on_backend()
        self._pump(None)

    def _pump(self, current: int | None) -> bool:
        """Move tx packets to the muxer and pending packets to rx buffers until nothing
        moves. Interrupts for queues other than `current` are sent here (the base sends
        the current queue's). Returns whether `current` may be re-armed as drained."""
        rxq, txq = self._queue(RX_QUEUE), self._queue(TX_QUEUE)
        rx_before = rxq.next_used if rxq else 0
        tx_before = txq.next_used if txq else 0
        for _ in range(MAX_ROUNDS):
            if self.stopping:
                break
            moved = self._drain_tx(txq) + self._fill_rx(rxq)
            if not moved:
                break
        else:
            self.wake()  # still busy: continue after the I/O thread checks its stop fd
        if rxq is not None and current != RX_QUEUE:
            self._signal(rxq, rx_before)
        if txq is not None and current != TX_QUEUE:
            self._signal(txq, tx_before)
        # rx buffers stay posted until there is something to put in them: never "drained"
        # (the base would otherwise spin on the pending buffers).
        return current == TX_QUEUE and not self._tx_blocked

    def _queue(self, index: int) -> Virtqueue | None:
        return self.queues[index] if index < len(self.queues) else None

    def _signal(self, q: Virtqueue, before: int) -> None:
        if q.next_used != before and q.needs_notification() and self._interrupt is not None:
            self.stats.interrupts += 1
            self._interrupt.signal_used_buffer()

    def _drain_tx(self, txq: Virtqueue | None) -> int:
        muxer = self.muxer
        if txq is None or muxer is None:
            return 0
        n = 0
        while n < txq.size and not self.stopping:
            self._tx_blocked = muxer.tx_blocked
            if self._tx_blocked:
                break
            chain = txq.pop()
            if chain is None:
                if txq.enable_notification():
                    continue
                break
            pkt = self._read_packet(chain)
            txq.add_used(chain.head, 0)  # §5.10.6.4: tx buffers are read, not written
            n += 1
            if isinstance(pkt, Unroutable):
                muxer.handle_unroutable(pkt)
            else:
                muxer.handle_tx(pkt)
        return n

    def _read_packet(self, chain: DescriptorChain) -> Packet | Unroutable:
        """Parse one tx chain (GuestProtocolError for a broken or hostile driver)."""
        descs = chain.descriptors()
        if any(d.writable for d in descs):
            raise GuestProtocolError("device-writable buffer in a tx packet (§5.10.6.4)")
        available = chain.readable_len - HDR_SIZE
        if available < 0:
            raise GuestProtocolError(
                f"tx chain of {chain.readable_len} bytes cannot hold a {HDR_SIZE}-byte header"
            )
        try:
            hdr = parse_tx_header(
                _read_prefix(chain, HDR_SIZE), guest_cid=self.cid, available=available
            )
        except Unroutable as exc:
            return exc
        payload = _read_range(chain, HDR_SIZE, hdr.len) if hdr.len else b""
        return Packet(hdr, payload)

    def _fill_rx(self, rxq: Virtqueue | None) -> int:
        muxer = self.muxer
        if rxq is None or muxer is None:
            return 0
        n = 0
        while n < rxq.size and muxer.has_rx() and not self.stopping:
            chain = rxq.pop()
            if chain is None:
                if rxq.enable_notification():  # re-armed: the guest notifies new buffers
                    continue
                break
            capacity = self._rx_capacity(chain)
            pkt = muxer.next_rx(capacity)
            if pkt is None:
                rxq.undo_pop()  # nothing after all (a spurious wakeup): keep the buffer
                break
            header, payload = pkt
            chain.write_writable(header)
            if payload:
                chain.write_writable(payload, HDR_SIZE)
            rxq.add_used(chain.head, HDR_SIZE + len(payload))
            n += 1
        return n

    def _rx_capacity(self, chain: DescriptorChain) -> int:
        descs = chain.descriptors()
        if any(not d.writable for d in descs):
            raise GuestProtocolError("device-readable buffer in an rx buffer (§5.10.6.4)")
        room = chain.writable_len - HDR_SIZE
        if room < 0:
            raise GuestProtocolError(
                f"rx buffer of {chain.writable_len} bytes cannot hold a {HDR_SIZE}-byte header"
            )
        return min(room, MAX_PAYLOAD)


def _read_prefix(chain: DescriptorChain, n: int) -> bytes:
    return _read_range(chain, 0, n)


def _read_range(chain: DescriptorChain, offset: int, n: int) -> bytes:
    """Bytes [offset, offset+n) of the chain's device-readable buffers (a copy), without
    reading the rest of a buffer the driver made longer than the packet."""
    parts: list[bytes] = []
    for d in chain.readable:
        if n == 0:
            break
        if offset >= d.len:
            offset -= d.len
            continue
        take = min(d.len - offset, n)
        parts.append(chain.mem.read_exact(d.addr + offset, take))
        n -= take
        offset = 0
    return b"".join(parts)


def open_vsock(
    spec: VsockSpec,
    events: SecurityEventSink,
    *,
    listener_socket: socket.socket | None = None,
    connector: Connector | None = None,
) -> VirtioVsock:
    """The vsock device for `spec`, its listening socket bound at spec.uds (mode 0600).
    VsockConfigError explains a reserved CID or an unusable path. Call `close()` on the
    device at VM teardown to remove the socket.

    The jailed worker's form: `listener_socket` is the socket its host side already bound
    and listens on at spec.uds (the host side removes the path; this device only closes
    the socket), and `connector` makes guest-initiated connections (through the host
    side); nothing is bound, connected or checked on the file system here."""
    if listener_socket is None:
        check_spec(spec)
        listener = bind_listener(spec.uds)
    else:
        if not MIN_GUEST_CID <= spec.cid <= MAX_GUEST_CID:
            raise VsockConfigError(f"vsock CID {spec.cid} is reserved or out of range")
        listener_socket.setblocking(False)
        listener = HostListener(listener_socket, spec.uds, None)
    return VirtioVsock(events, cid=spec.cid, uds=spec.uds, listener=listener,
                       connector=connector)
