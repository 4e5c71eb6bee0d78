"""virtio-net, the network device (virtio 1.2 §5.1), with a TAP backend.

Queues: receiveq1 (0) and transmitq1 (1); no control queue, one queue pair (§5.1.2).
Features: MAC and STATUS (link up) in the config space (§5.1.4), mergeable receive
buffers, and the checksum/segmentation offloads, each in force only once negotiated:
the guest-side ones are mirrored to the TAP with TUNSETOFFLOAD at DRIVER_OK, so the
kernel never hands the driver a packet it did not ask for (§5.1.6.4.1).

Transmit (§5.1.6.2). A chain is the 12-byte header and the frame, device-readable only.
The header is copied out and checked (net_header.check_tx) before anything else; the
frame goes to the TAP with writev straight from guest-memory views behind our own copy of
the header, so the driver cannot change the header after the check. Bad headers, frame
lengths outside 14..65550 bytes and writable buffers are bad requests: the packet is
dropped, the chain completed, the device carries on.

Receive (§5.1.6.3, §5.1.6.4). When the TAP is readable and the driver has posted buffers,
one frame is read with readv: the header into a host buffer (checked and rewritten with
num_buffers), the frame straight into guest buffers, and anything past them into one
bounded spill buffer. With mergeable buffers a frame spreads over as many chains as it
needs, each filled completely but the last (§5.1.6.4.1); without, a frame that does not fit
the one buffer is dropped. With no buffers left the TAP is taken out of the I/O thread's
epoll until the driver posts more, so there is no busy loop and no host-side queue: the
kernel's own TAP queue (bounded by txqueuelen) holds what waits, and at most one frame
lives in the device.

Rate limiters (one per direction, bandwidth in bytes and operations in frames) defer,
never drop: a throttled transmit chain or received frame is kept and retried when
`next_wakeup` says the tokens are back.

A broken chain (loop, buffer outside RAM, ...) is a GuestProtocolError from the chain
walker: the device goes NEEDS_RESET with a security event, and nothing else is affected.
"""

from __future__ import annotations

import enum
import logging
import select
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from isovisor.devices.events import SecurityEventSink
from isovisor.devices.ratelimit import KEEP, BucketSpec, Keep, RateLimiter
from isovisor.devices.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    VNET_HEADER_SIZE,
    TapError,
)
from isovisor.devices.virtio.chain import BadRequest, Descriptor, DescriptorChain
from isovisor.devices.virtio.constants import DEVICE_ID_NET
from isovisor.devices.virtio.device import VirtioDevice
from isovisor.devices.virtio.net_header import (
    ETH_HLEN,
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_ECN,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_GUEST_UFO,
    F_HOST_ECN,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_HOST_UFO,
    F_MAC,
    F_MRG_RXBUF,
    F_STATUS,
    GUEST_GSO,
    HEADER_SIZE,
    MAX_FRAME,
    MAX_PLAIN_FRAME,
    S_LINK_UP,
    NetHeader,
    check_tx,
    feature_problem,
    sanitize_rx,
)
from isovisor.devices.virtio.queue import Virtqueue
from isovisor.memory import GuestMemory

log = logging.getLogger(__name__)

assert VNET_HEADER_SIZE == HEADER_SIZE  # the TAP's header is the guest's header

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256
# Frames moved per I/O-thread wake-up and direction: a flood in one direction cannot keep
# the thread from the other queue, a notify or a reset for long.
RX_BURST = 64
TX_BURST = 256
# iovecs per readv/writev, below the kernel's IOV_MAX of 1024.
IOV_BUDGET = 1000

# Guest-side offloads -> the TAP offload flags that let the kernel send them (if_tun.h).
_TUN_OFFLOADS = (
    (F_GUEST_CSUM, TUN_F_CSUM),
    (F_GUEST_TSO4, TUN_F_TSO4),
    (F_GUEST_TSO6, TUN_F_TSO6),
    (F_GUEST_ECN, TUN_F_TSO_ECN),
    (F_GUEST_UFO, TUN_F_UFO),
)


class NetBackend(Protocol):
    """What the device needs of its backend (isovisor.devices.tap.Tap satisfies it): one
    frame per readv/writev, each preceded by a 12-byte virtio-net header."""

    name: str
    ufo: bool

    @property
    def fd(self) -> int: ...

    def set_offloads(self, flags: int) -> None: ...

    def readv(self, buffers: Sequence[memoryview | bytearray]) -> int | None: ...

    def writev(self, buffers: Sequence[memoryview | bytes]) -> int: ...

    def close(self) -> None: ...


def tun_offloads(features: int) -> int:
    """The TUNSETOFFLOAD flags for a negotiated feature set."""
    return sum(flag for feature, flag in _TUN_OFFLOADS if features & feature)


@dataclass
class NetStats:
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_bad: int = 0  # bad requests: header, length, writable buffers (dropped)
    tx_errors: int = 0  # the TAP refused the frame (dropped)
    tx_throttled: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_bad_buffers: int = 0  # receive chains with readable parts or < 12 bytes
    rx_dropped: int = 0  # frames too long for the buffers, or with a header not negotiated
    rx_spilled: int = 0  # frames that waited in the spill buffer for more chains
    rx_no_buffers: int = 0  # times the TAP was paused for want of receive buffers
    rx_throttled: int = 0
    backend_errors: int = 0


class _RxStop(enum.Enum):
    EMPTY = "the TAP has no frame"
    NO_BUFFERS = "no receive buffers"
    THROTTLED = "rate limited"
    BUDGET = "burst done"
    BACKEND = "backend failed"


@dataclass
class _TxRequest:
    head: int
    header: NetHeader  # checked copy
    descriptors: tuple[Descriptor, ...]  # header + frame, device-readable
    frame_len: int


@dataclass
class _RxFrame:
    header: NetHeader  # sanitized; num_buffers set when published
    used: list[tuple[DescriptorChain, int]]  # chains and bytes written, in order
    length: int  # header + frame bytes
    spill: int = 0  # frame bytes still in the spill buffer
    spill_off: int = 0
    admitted: bool = False  # the rate limiter let it through


def _views(
    mem: GuestMemory, descriptors: Sequence[Descriptor], skip: int, out: list[memoryview]
) -> None:
    """Append views of `descriptors`' buffers, leaving out their first `skip` bytes."""
    for d in descriptors:
        if skip >= d.len:
            skip -= d.len
            continue
        out.append(mem.view(d.addr + skip, d.len - skip))
        skip = 0


def _release(views: list[memoryview]) -> None:
    for v in views:
        v.release()
    views.clear()


class VirtioNet(VirtioDevice):
    device_type = DEVICE_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-net"

    def __init__(
        self,
        events: SecurityEventSink,
        backend: NetBackend,
        *,
        mac: bytes,
        rx_limiter: RateLimiter | None = None,
        tx_limiter: RateLimiter | None = None,
        offloads: bool = True,
    ) -> None:
        super().__init__(events)
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"{mac.hex(':')} is not a unicast MAC address")
        self.backend = backend
        self.mac = bytes(mac)
        self.rx_limiter = rx_limiter
        self.tx_limiter = tx_limiter
        self.offloads = offloads
        self.net_stats = NetStats()
        self._hdr = bytearray(HEADER_SIZE)  # the TAP's header of the frame being read
        self._spill = bytearray(HEADER_SIZE + MAX_FRAME + 1)  # one frame's overflow
        self._rx_spare: deque[DescriptorChain] = deque()  # checked, popped, not yet used
        self._rx_frame: _RxFrame | None = None
        self._tx_pending: _TxRequest | None = None
        self._rx_ep: select.epoll | None = None
        self._tap_watched = False
        self._backend_failed = False

    # --- identity, features, config (§5.1.3, §5.1.4) ------------------------------------

    def device_features(self) -> int:
        f = F_MAC | F_STATUS | F_MRG_RXBUF
        if self.offloads:
            f |= F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN
            f |= F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN
            if self.backend.ufo:
                f |= F_GUEST_UFO | F_HOST_UFO
        return f

    def config_space(self) -> bytes:
        # mac[6], status, max_virtqueue_pairs (meaningful with MQ only; we have one pair).
        status = S_LINK_UP
        return self.mac + status.to_bytes(2, "little") + (1).to_bytes(2, "little")

    def features_ok(self, features: int) -> bool:
        problem = feature_problem(features)
        if problem is not None:
            log.info("%s: refusing features %#x: %s", self.source, features, problem)
        return problem is None

    # --- activation -----------------------------------------------------------------------

    def on_activate(self) -> None:
        self.backend.set_offloads(tun_offloads(self.acked_features))
        self._rx_ep = select.epoll()
        # The TAP sits in an epoll of its own, watched by the I/O thread's epoll: pausing
        # reception is taking the TAP out of the inner one.
        self.watch_fd(self._rx_ep.fileno(), self._on_tap_readable)
        if self.queues[RX_QUEUE] is not None:
            self._watch_tap(True)

    def on_reset(self) -> None:
        self._rx_spare.clear()
        self._rx_frame = None
        self._tx_pending = None
        self._tap_watched = False
        if self._rx_ep is not None:
            self._rx_ep.close()
            self._rx_ep = None
        if not self._backend_failed:
            try:
                self.backend.set_offloads(0)
            except TapError as exc:
                log.warning("%s: %s", self.source, exc)

    def close(self) -> None:
        """VM teardown: stop the device and close the backend."""
        self.reset()
        self.backend.close()

    def _watch_tap(self, on: bool) -> None:
        ep = self._rx_ep
        if ep is None or on == self._tap_watched or (on and self._backend_failed):
            return
        if on:
            ep.register(self.backend.fd, select.EPOLLIN)
        else:
            ep.unregister(self.backend.fd)
        self._tap_watched = on

    def _on_tap_readable(self) -> None:
        self._process(RX_QUEUE)  # the base signals used buffers as for a notify

    # --- queues ---------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> bool:
        if index == TX_QUEUE:
            return self._tx(queue)
        stop = self._rx(queue)
        if stop is _RxStop.NO_BUFFERS:
            if self._tap_watched:
                self.net_stats.rx_no_buffers += 1
            self._watch_tap(False)
            # Drained: the base re-arms notifications and calls again if buffers came.
            return True
        self._watch_tap(stop in (_RxStop.EMPTY, _RxStop.BUDGET))
        # Buffers may be waiting in the ring: they wait for frames, not for us, so never
        # report the queue drained here (the base would loop on them).
        return False

    def next_wakeup(self) -> float | None:
        waits: list[float] = []
        frame, req = self._rx_frame, self._tx_pending
        if frame is not None and not frame.spill and not frame.admitted:
            lim = self.rx_limiter
            n = frame.length - HEADER_SIZE
            waits.append(lim.time_until(nbytes=n, nops=1) if lim is not None else 0.0)
        if req is not None:
            lim = self.tx_limiter
            waits.append(lim.time_until(nbytes=req.frame_len, nops=1) if lim else 0.0)
        return min(waits) if waits else None

    def set_rate_limit(
        self,
        *,
        rx_bandwidth: BucketSpec | Keep | None = KEEP,
        rx_ops: BucketSpec | Keep | None = KEEP,
        tx_bandwidth: BucketSpec | Keep | None = KEEP,
        tx_ops: BucketSpec | Keep | None = KEEP,
    ) -> None:
        """Change the limits while the VM runs (thread-safe); waiting work is retried."""
        if self.rx_limiter is None:
            self.rx_limiter = RateLimiter()
        if self.tx_limiter is None:
            self.tx_limiter = RateLimiter()
        self.rx_limiter.update(bandwidth=rx_bandwidth, ops=rx_ops)
        self.tx_limiter.update(bandwidth=tx_bandwidth, ops=tx_ops)
        self.wake()

    # --- transmit (§5.1.6.2) -------------------------------------------------------------

    def _tx(self, queue: Virtqueue) -> bool:
        for _ in range(TX_BURST):
            if self.stopping:
                return False
            req = self._tx_pending
            if req is None:
                chain = queue.pop()
                if chain is None:
                    return True
                try:
                    req = self._tx_request(chain)
                except BadRequest as exc:
                    self.net_stats.tx_bad += 1
                    log.debug("%s: transmit dropped: %s", self.source, exc)
                    queue.add_used(chain.head, 0)
                    continue
            self._tx_pending = None
            lim = self.tx_limiter
            if lim is not None and not lim.consume(nbytes=req.frame_len, nops=1):
                self._tx_pending = req
                self.net_stats.tx_throttled += 1
                return False
            self._transmit(req)
            queue.add_used(req.head, 0)  # §5.1.6.2: the device writes nothing back
        self.wake()  # the burst is spent: come back after whatever else is waiting
        return False

    def _tx_request(self, chain: DescriptorChain) -> _TxRequest:
        """Check a transmit chain (GuestProtocolError propagates) and copy its header."""
        descriptors = chain.descriptors()
        if chain.writable:
            raise BadRequest("device-writable buffer in a transmit chain (§5.1.6.2)")
        total = chain.readable_len
        if total < HEADER_SIZE + ETH_HLEN or total > HEADER_SIZE + MAX_FRAME:
            raise BadRequest(f"transmit chain of {total} bytes")
        assert self.mem is not None
        raw = bytearray()
        for d in descriptors:
            if len(raw) == HEADER_SIZE:
                break
            raw += self.mem.read_exact(d.addr, min(d.len, HEADER_SIZE - len(raw)))
        header = check_tx(NetHeader.parse(raw), total - HEADER_SIZE, self.acked_features)
        return _TxRequest(chain.head, header, descriptors, total - HEADER_SIZE)

    def _transmit(self, req: _TxRequest) -> None:
        assert self.mem is not None
        views: list[memoryview] = []
        try:
            _views(self.mem, req.descriptors, HEADER_SIZE, views)
            self.backend.writev([req.header.pack(), *views])
        except OSError as exc:  # EAGAIN (queue full), EIO (down), EINVAL: the kernel said no
            self.net_stats.tx_errors += 1
            log.debug("%s: TAP write failed: %s", self.source, exc)
            return
        finally:
            _release(views)
        self.net_stats.tx_frames += 1
        self.net_stats.tx_bytes += req.frame_len

    # --- receive (§5.1.6.3, §5.1.6.4) ----------------------------------------------------

    @property
    def _mergeable(self) -> bool:
        return self.negotiated(F_MRG_RXBUF)

    def _rx(self, queue: Virtqueue) -> _RxStop:
        if self._backend_failed:
            return _RxStop.BACKEND
        for _ in range(RX_BURST):
            if self.stopping:
                return _RxStop.BUDGET
            if self._rx_frame is None:
                if not self._rx_gather(queue):
                    return _RxStop.NO_BUFFERS
                got = self._rx_read()
                if isinstance(got, _RxStop):
                    return got
                if got is None:
                    continue  # dropped
                self._rx_frame = got
            frame = self._rx_frame
            if frame.spill:
                if not self._rx_place_spill(queue, frame):
                    return _RxStop.NO_BUFFERS
                if self._rx_frame is None:
                    continue  # dropped: it could never fit
            if not frame.admitted:
                lim = self.rx_limiter
                if lim is not None and not lim.consume(
                    nbytes=frame.length - HEADER_SIZE, nops=1
                ):
                    self.net_stats.rx_throttled += 1
                    return _RxStop.THROTTLED
                frame.admitted = True
            self._rx_publish(queue, frame)
            self._rx_frame = None
        return _RxStop.BUDGET

    def _rx_pop(self, queue: Virtqueue) -> DescriptorChain | None:
        """The next usable receive chain from the ring (bad ones are completed empty)."""
        while True:
            chain = queue.pop()
            if chain is None:
                return None
            chain.descriptors()  # GuestProtocolError propagates: NEEDS_RESET
            if chain.readable or chain.writable_len < HEADER_SIZE:
                # §5.1.6.3.1: receive buffers are device-writable and (mergeable or not)
                # hold at least the header. Give it back empty and carry on.
                self.net_stats.rx_bad_buffers += 1
                queue.add_used(chain.head, 0)
                continue
            return chain

    def _rx_gather(self, queue: Virtqueue) -> bool:
        """Pop chains until the spare ones hold a typical largest frame (one chain without
        mergeable buffers). False if there is none at all."""
        spare = self._rx_spare
        if not self._mergeable:
            if not spare:
                chain = self._rx_pop(queue)
                if chain is not None:
                    spare.append(chain)
            return bool(spare)
        target = HEADER_SIZE + (MAX_FRAME if self.acked_features & GUEST_GSO else MAX_PLAIN_FRAME)
        room = sum(c.writable_len for c in spare)
        while room < target and len(spare) < QUEUE_SIZE:
            chain = self._rx_pop(queue)
            if chain is None:
                break
            spare.append(chain)
            room += chain.writable_len
        return bool(spare)

    def _rx_read(self) -> _RxFrame | _RxStop | None:
        """Read one frame into the spare chains (and the spill buffer); None if dropped."""
        assert self.mem is not None
        spare = self._rx_spare
        chains: list[DescriptorChain] = []
        views: list[memoryview] = []
        iovs = 2  # the header and the spill buffer
        room = 0
        try:
            for chain in spare if self._mergeable else (spare[0],):
                descriptors = chain.writable
                if chains and iovs + len(descriptors) > IOV_BUDGET:
                    break
                _views(self.mem, descriptors, HEADER_SIZE if not chains else 0, views)
                chains.append(chain)
                iovs += len(descriptors)
                room += chain.writable_len
            n = self.backend.readv([self._hdr, *views, self._spill])
        except OSError as exc:
            self._rx_backend_failed(exc)
            return _RxStop.BACKEND
        finally:
            _release(views)
        if n is None:
            return _RxStop.EMPTY
        if not HEADER_SIZE + ETH_HLEN <= n <= HEADER_SIZE + MAX_FRAME:
            self.net_stats.rx_dropped += 1  # runt, or truncated by the kernel: too long
            return None
        header = sanitize_rx(NetHeader.parse(self._hdr), self.acked_features)
        if header is None:
            self.net_stats.rx_dropped += 1
            return None
        used: list[tuple[DescriptorChain, int]] = []
        left = n
        for chain in chains:
            if left == 0:
                break
            take = min(chain.writable_len, left)
            used.append((chain, take))
            left -= take
        if left and not self._mergeable:
            self.net_stats.rx_dropped += 1  # §5.1.6.3.1: the buffer was too small
            return None
        for _ in used:
            spare.popleft()
        if left:
            self.net_stats.rx_spilled += 1
        # The tail past the guest buffers (n - room bytes) starts the spill buffer.
        return _RxFrame(header, used, n, spill=left)

    def _rx_place_spill(self, queue: Virtqueue, frame: _RxFrame) -> bool:
        """Copy the spilled tail of `frame` into more chains; False if they ran out."""
        spill = memoryview(self._spill)
        try:
            while frame.spill:
                if len(frame.used) >= queue.size:
                    # A whole ring of chains and still no room (tiny buffers): it can never
                    # fit. Drop it and keep the chains for the next frame.
                    self.net_stats.rx_dropped += 1
                    self._rx_spare.extendleft(c for c, _ in reversed(frame.used))
                    self._rx_frame = None
                    return True
                chain = self._rx_spare.popleft() if self._rx_spare else self._rx_pop(queue)
                if chain is None:
                    return False
                take = min(chain.writable_len, frame.spill)
                chain.write_writable(spill[frame.spill_off : frame.spill_off + take])
                frame.used.append((chain, take))
                frame.spill_off += take
                frame.spill -= take
            return True
        finally:
            spill.release()

    def _rx_publish(self, queue: Virtqueue, frame: _RxFrame) -> None:
        # §5.1.6.4.1: num_buffers is 1 without mergeable buffers, else the chains used.
        first = frame.used[0][0]
        first.write_writable(replace(frame.header, num_buffers=len(frame.used)).pack())
        for chain, n in frame.used:
            queue.add_used(chain.head, n)
        self.net_stats.rx_frames += 1
        self.net_stats.rx_bytes += frame.length - HEADER_SIZE

    def _rx_backend_failed(self, exc: OSError) -> None:
        # Not the guest's doing (the TAP was deleted, say): stop reading, keep the device.
        self.net_stats.backend_errors += 1
        log.error("%s: TAP %s read failed, receive stopped: %s", self.source,
                  self.backend.name, exc)
        self._backend_failed = True
        self._watch_tap(False)
