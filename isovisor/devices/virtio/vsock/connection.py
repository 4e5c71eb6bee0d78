"""One vsock stream connection between a guest socket and a host Unix socket.

States (virtio 1.2 §5.10.6.5):

    CONNECTING   host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE
                 (RST or REQUEST_TIMEOUT end it)
    ESTABLISHED  bytes flow both ways; half-closes are tracked in the shutdown flags
    CLOSING      the guest shut down both directions: the host socket is flushed, closed,
                 and answered with RST (CLOSE_TIMEOUT bounds the flush)
    CLOSED       the host socket is closed; an RST may still wait for an rx buffer

Half-close and reset map onto the Unix socket:
- guest SHUTDOWN(SEND): once buffered guest bytes are written, shutdown(SHUT_WR): the
  host reads EOF; guest SHUTDOWN(RCV): shutdown(SHUT_RD) and nothing more is read for it;
  both: flush, close, RST (the clean disconnect of §5.10.6.5);
- host EOF: SHUTDOWN(SEND) to the guest, or SHUTDOWN(SEND|RCV) if the host closed its
  socket completely (then the guest answers RST, or we send one after CLOSE_TIMEOUT);
- guest RST: close the socket at once, buffered bytes dropped; a host socket error: RST.

Flow control (§5.10.6.3), both directions in payload bytes with u32 free-running counters:
- host to guest: never more than peer_buf_alloc - (tx_cnt - peer_fwd_cnt) bytes in flight;
  bytes are read from the host socket only when the guest has credit and an rx buffer is
  at hand, straight into that buffer: nothing is buffered on this side.
- guest to host: we advertise buf_alloc = CONN_BUF_SIZE, hold what the host socket does
  not take at once, and count into fwd_cnt what it did take. A guest that sends past that
  credit is a broken driver (HostilePacket). fwd_cnt reaches the guest in every header we
  send, and in a CREDIT_UPDATE when the guest's view of our free space has dropped below
  CREDIT_UPDATE_THRESHOLD and we forwarded something since (or it asked: CREDIT_REQUEST).
"""

from __future__ import annotations

import enum
import select
import socket

from isovisor.devices.virtio.vsock.packet import (
    MAX_PAYLOAD,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    Header,
    HostilePacket,
    Op,
    host_header,
)
from isovisor.devices.virtio.vsock.poller import Poller

_U32 = 0xFFFF_FFFF
# Guest bytes held per connection that the host socket has not taken yet: the buf_alloc we
# advertise. With MAX_CONNECTIONS (muxer) it bounds what a guest can make the host hold.
CONN_BUF_SIZE = 256 * 1024
# Send a CREDIT_UPDATE once the guest believes less than this is free (and we have freed
# some): well before it stalls, without one update per packet.
CREDIT_UPDATE_THRESHOLD = CONN_BUF_SIZE // 2
# Seconds the guest has to answer a host-initiated REQUEST (Firecracker uses 2 s too).
REQUEST_TIMEOUT = 2.0
# Seconds a closing connection may take to flush to the host, or the guest to answer our
# SHUTDOWN(SEND|RCV) with RST (§5.10.6.5 "implementation-specific"; Linux uses 8 s).
CLOSE_TIMEOUT = 8.0


class State(enum.Enum):
    CONNECTING = "connecting"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


class Pending(enum.IntFlag):
    """What the connection has to put on the rx queue (each at most once: bounded)."""

    NONE = 0
    RST = enum.auto()
    REQUEST = enum.auto()
    RESPONSE = enum.auto()
    RW = enum.auto()  # the host socket was readable: data to move
    SHUTDOWN = enum.auto()
    CREDIT_UPDATE = enum.auto()


class Connection:
    """A connection keyed by (local port, peer port); all of it runs on the I/O thread."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        guest_cid: int,
        local_port: int,
        peer_port: int,
        poller: Poller,
        now: float,
        host_initiated: bool,
        peer_buf_alloc: int = 0,
        peer_fwd_cnt: int = 0,
    ) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self.guest_cid = guest_cid
        self.local_port = local_port
        self.peer_port = peer_port
        self.poller = poller
        self.state = State.CONNECTING if host_initiated else State.ESTABLISHED
        self.pending = Pending.REQUEST if host_initiated else Pending.RESPONSE
        self.deadline: float | None = now + REQUEST_TIMEOUT if host_initiated else None
        # host -> guest
        self.tx_cnt = 0
        self.peer_buf_alloc = peer_buf_alloc
        self.peer_fwd_cnt = peer_fwd_cnt
        # guest -> host
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.last_fwd_sent = 0
        self.outbuf = bytearray()
        self.prefix = 0  # leading outbuf bytes that are ours ("OK <port>\n"), not counted
        # shutdowns
        self.peer_shutdown = 0  # SHUTDOWN flags the guest sent (permanent, §5.10.6.5)
        self.local_shutdown = 0  # SHUTDOWN flags we told the guest
        self.host_eof = False
        self._shut_wr_done = False
        self.credit_overruns = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    @property
    def finished(self) -> bool:
        """Closed with nothing left to tell the guest: the muxer forgets it."""
        return self.state is State.CLOSED and not self.pending

    # --- credit ----------------------------------------------------------------------

    def peer_credit(self) -> int:
        """Bytes the guest can take now (§5.10.6.3). A guest whose fwd_cnt runs ahead of
        what we sent gets no credit: its connection stalls, no one else's."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)

    def buffered(self) -> int:
        """Guest bytes we hold that the host socket has not taken."""
        return (self.rx_cnt - self.fwd_cnt) & _U32

    # --- epoll interest --------------------------------------------------------------

    def can_read_host(self) -> bool:
        return (
            self.state is State.ESTABLISHED
            and self.sock is not None
            and not self.host_eof
            and not self.peer_shutdown & SHUTDOWN_RCV
            and not self.pending & Pending.RW
            and self.peer_credit() > 0
        )

    def wanted_events(self) -> int:
        mask = 0
        if self.can_read_host():
            mask |= select.EPOLLIN
        if self.outbuf and self.sock is not None:
            mask |= select.EPOLLOUT
        return mask

    def sync(self) -> None:
        """Bring the poller in line with what the connection can act on now."""
        if self.sock is not None:
            self.poller.set(self.sock.fileno(), self.wanted_events(), self)

    # --- guest packets (tx queue) ---------------------------------------------------

    def on_packet(self, hdr: Header, payload: bytes, now: float) -> None:
        """A guest packet for this connection. HostilePacket on a credit overrun."""
        if hdr.op is Op.RST:
            self._close_socket()  # §5.10.6.5: the guest aborted; nothing is answered
            self.pending = Pending.NONE
            self.state = State.CLOSED
            return
        if self.state is State.CLOSED:
            return  # our RST is on its way; the guest will learn
        # §5.10.6.3: every packet of a stream carries the sender's credit information.
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        op = hdr.op
        if self.state is State.CONNECTING:
            if op is not Op.RESPONSE:
                self.reset()
                return
            self.state = State.ESTABLISHED
            self.deadline = None
            line = f"OK {self.local_port}\n".encode()
            self.outbuf[:0] = line
            self.prefix += len(line)
            self.flush(now)
            return
        if op is Op.RW:
            self._on_rw(hdr, payload, now)
        elif op is Op.SHUTDOWN:
            self.peer_shutdown |= hdr.flags
            self._apply_peer_shutdown(now)
        elif op is Op.CREDIT_REQUEST:
            self.pending |= Pending.CREDIT_UPDATE
        elif op is Op.CREDIT_UPDATE:
            pass  # the credit fields above are the whole message
        else:  # REQUEST or RESPONSE on a running connection: the guest lost track
            self.reset()

    def _on_rw(self, hdr: Header, payload: bytes, now: float) -> None:
        if self.state is not State.ESTABLISHED or self.peer_shutdown & SHUTDOWN_SEND:
            self.reset()  # data after the guest said it sends no more
            return
        if hdr.len > CONN_BUF_SIZE - self.buffered():
            # §5.10.6.3: "RW data packets MUST only be transmitted when the peer has
            # sufficient free buffer space": this driver ignores the credit we gave it.
            self.credit_overruns += 1
            raise HostilePacket(
                f"RW of {hdr.len} bytes on port {self.local_port} overruns the credit "
                f"({CONN_BUF_SIZE - self.buffered()} bytes free)"
            )
        self.rx_cnt = (self.rx_cnt + len(payload)) & _U32
        if self.sock is None:
            return
        self.outbuf += payload
        self.flush(now)

    def _apply_peer_shutdown(self, now: float) -> None:
        if self.peer_shutdown & SHUTDOWN_SEND:
            self.pending &= ~Pending.CREDIT_UPDATE  # it sends no more: credit is moot
        if self.peer_shutdown & SHUTDOWN_RCV:
            self.pending &= ~Pending.RW
            if self.sock is not None and not self.host_eof:
                _shutdown(self.sock, socket.SHUT_RD)  # the host's writes now fail (EPIPE)
        if self.peer_shutdown & SHUTDOWN_BOTH == SHUTDOWN_BOTH and self.state is not State.CLOSING:
            self.state = State.CLOSING
            self.deadline = now + CLOSE_TIMEOUT
        self.flush(now)

    # --- host socket ----------------------------------------------------------------

    def on_event(self, events: int, now: float) -> None:
        """The poller reported `events` for the host socket."""
        if self.sock is None:
            return
        broken = events & (select.EPOLLHUP | select.EPOLLERR)
        if events & select.EPOLLOUT or (self.outbuf and broken):
            self.flush(now)
        if self.sock is not None and self.can_read_host() and events & (
            select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
        ):
            self.pending |= Pending.RW  # read when an rx buffer is at hand

    def flush(self, now: float) -> None:
        """Write held guest bytes to the host socket; finish shutdowns that waited."""
        sock = self.sock
        while sock is not None and self.outbuf:
            try:
                n = sock.send(self.outbuf, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                self.reset()  # EPIPE, ECONNRESET: the host side is gone
                return
            counted = max(0, n - self.prefix)
            self.prefix = max(0, self.prefix - n)
            self.fwd_cnt = (self.fwd_cnt + counted) & _U32
            del self.outbuf[:n]
        if sock is None or self.outbuf:
            return
        if self.peer_shutdown & SHUTDOWN_SEND and not self._shut_wr_done:
            self._shut_wr_done = True
            _shutdown(sock, socket.SHUT_WR)  # the host reads EOF
            self._winding_down(now)
        if self.state is State.CLOSING and self.peer_shutdown & SHUTDOWN_BOTH == SHUTDOWN_BOTH:
            self.reset()  # flushed: close and answer the guest's shutdown with RST
            return
        self._maybe_credit_update()

    def _maybe_credit_update(self) -> None:
        if self.fwd_cnt == self.last_fwd_sent or self.peer_shutdown & SHUTDOWN_SEND:
            return
        seen_free = CONN_BUF_SIZE - ((self.rx_cnt - self.last_fwd_sent) & _U32)
        if seen_free < CREDIT_UPDATE_THRESHOLD:
            self.pending |= Pending.CREDIT_UPDATE

    def _on_host_eof(self, now: float) -> None:
        self.host_eof = True
        self.pending &= ~Pending.RW
        flags = SHUTDOWN_SEND
        if self.sock is not None and _hung_up(self.sock):
            flags |= SHUTDOWN_RCV  # closed, not just shut for writing: it reads no more
            self.deadline = now + CLOSE_TIMEOUT  # §5.10.6.5: RST if the guest does not
        self.local_shutdown |= flags
        self.pending |= Pending.SHUTDOWN
        self._winding_down(now)

    def _winding_down(self, now: float) -> None:
        """Once nothing can flow either way (host EOF, guest SHUTDOWN(SEND) flushed), the
        guest has CLOSE_TIMEOUT to close its socket (SHUTDOWN or RST) before our RST."""
        if self.host_eof and self._shut_wr_done and self.deadline is None:
            self.deadline = now + CLOSE_TIMEOUT

    # --- packets for the guest (rx queue) ------------------------------------------

    def next_packet(
        self, capacity: int, scratch: bytearray, now: float
    ) -> tuple[bytes, memoryview] | None:
        """The next packet for the guest with at most `capacity` payload bytes, as
        (header, payload); None when nothing is pending after all."""
        empty = memoryview(scratch)[:0]
        while self.pending:
            p = self.pending
            if p & Pending.RST:
                self.pending = Pending.NONE
                return self._header(Op.RST), empty
            if p & Pending.REQUEST:
                self.pending &= ~Pending.REQUEST
                return self._header(Op.REQUEST), empty
            if p & Pending.RESPONSE:
                self.pending &= ~Pending.RESPONSE
                return self._header(Op.RESPONSE), empty
            if p & Pending.RW:
                got = self._read_host(min(capacity, MAX_PAYLOAD, len(scratch)), scratch, now)
                if got:
                    self.tx_cnt = (self.tx_cnt + got) & _U32
                    return self._header(Op.RW, length=got), memoryview(scratch)[:got]
                continue  # nothing after all (or EOF / error: other flags now set)
            if p & Pending.SHUTDOWN:
                self.pending &= ~Pending.SHUTDOWN
                return self._header(Op.SHUTDOWN, flags=self.local_shutdown), empty
            self.pending &= ~Pending.CREDIT_UPDATE
            return self._header(Op.CREDIT_UPDATE), empty
        return None

    def _read_host(self, limit: int, scratch: bytearray, now: float) -> int:
        """Read up to min(limit, credit) bytes into scratch; manage the RW flag."""
        n = min(limit, self.peer_credit())
        sock = self.sock
        if n <= 0 or sock is None or not self._may_send_data():
            self.pending &= ~Pending.RW
            return 0
        try:
            got = sock.recv_into(scratch, n, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.pending &= ~Pending.RW
            return 0
        except OSError:
            self.reset()
            return 0
        if got == 0:
            self._on_host_eof(now)
            return 0
        if got < n or self.peer_credit() - got <= 0:
            self.pending &= ~Pending.RW  # drained for now (level-triggered epoll re-arms)
        return got

    def _may_send_data(self) -> bool:
        return (
            self.state is State.ESTABLISHED
            and not self.host_eof
            and not self.peer_shutdown & SHUTDOWN_RCV
        )

    def _header(self, op: Op, *, length: int = 0, flags: int = 0) -> bytes:
        self.last_fwd_sent = self.fwd_cnt  # every header carries our credit (§5.10.6.3)
        self.pending &= ~Pending.CREDIT_UPDATE
        return host_header(
            op, guest_cid=self.guest_cid, local_port=self.local_port, peer_port=self.peer_port,
            length=length, flags=flags, buf_alloc=CONN_BUF_SIZE, fwd_cnt=self.fwd_cnt,
        )

    # --- ending -----------------------------------------------------------------------

    def expire(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline and self.state is not State.CLOSED:
            self.reset()

    def reset(self) -> None:
        """Abort: close the host socket, drop held bytes, tell the guest RST."""
        self._close_socket()
        self.state = State.CLOSED
        self.pending = Pending.RST

    def close(self) -> None:
        """Device reset or teardown: close without telling the guest."""
        self._close_socket()
        self.state = State.CLOSED
        self.pending = Pending.NONE

    def _close_socket(self) -> None:
        self.deadline = None
        self.outbuf.clear()
        self.prefix = 0
        sock, self.sock = self.sock, None
        if sock is not None:
            self.poller.drop(sock.fileno())
            sock.close()


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # ENOTCONN: the host end is gone already; the next send or recv reports it


def _hung_up(sock: socket.socket) -> bool:
    """Whether the host closed its end entirely (POLLHUP), not only shut it for writing."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))
