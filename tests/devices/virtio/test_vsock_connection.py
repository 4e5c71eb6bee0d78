"""The connection state machine and credit accounting, without virtqueues or threads: guest
packets go into the muxer, packets for the guest come out, and the host side is real Unix
sockets in a tmp dir."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.devices.virtio.vsock.connection import (
    CLOSE_TIMEOUT,
    CONN_BUF_SIZE,
    CREDIT_UPDATE_THRESHOLD,
    REQUEST_TIMEOUT,
    Connection,
    State,
)
from isovisor.devices.virtio.vsock.listener import bind_listener
from isovisor.devices.virtio.vsock.muxer import Muxer
from isovisor.devices.virtio.vsock.packet import (
    MAX_PAYLOAD,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    HostilePacket,
    Op,
    Packet,
    Unroutable,
    parse_tx_header,
)
from isovisor.devices.virtio.vsock.poller import Poller
from tests.devices.virtio.vsock_helpers import GUEST_CID, Rx, hdr, unix_server

PORT = 5000
GPORT = 1000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Env:
    """A muxer with a fake clock; `tx` feeds guest packets, `rx` drains guest-bound ones."""

    def __init__(self, tmp: Path, *, listener: bool = False, max_connections: int = 64) -> None:
        self.tmp = tmp
        self.uds = tmp / "v.sock"
        self.clock = Clock()
        self.poller = Poller()
        self.listener = bind_listener(self.uds) if listener else None
        self.mux = Muxer(
            GUEST_CID, self.uds, self.listener, self.poller, clock=self.clock,
            max_connections=max_connections,
        )
        self.servers: dict[int, socket.socket] = {}
        self.accepted: list[socket.socket] = []

    def server(self, port: int = PORT) -> socket.socket:
        s = self.servers[port] = unix_server(self.tmp / f"v.sock_{port}")
        return s

    def accept(self, port: int = PORT) -> socket.socket:
        conn, _ = self.servers[port].accept()
        conn.settimeout(2)
        self.accepted.append(conn)
        return conn

    def tx(self, raw: bytes, payload: bytes = b"") -> None:
        try:
            h = parse_tx_header(raw, guest_cid=GUEST_CID, available=len(payload))
        except Unroutable as exc:
            self.mux.handle_unroutable(exc)
            return
        self.mux.handle_tx(Packet(h, payload))

    def rx(self, capacity: int = 4096, limit: int = 100) -> list[Rx]:
        out = []
        for _ in range(limit):
            pkt = self.mux.next_rx(capacity)
            if pkt is None:
                break
            header, payload = pkt
            out.append(_rx(header, bytes(payload)))
        return out

    def backend(self, timeout: float = 1.0) -> None:
        """Wait for the poller to have something, then let the muxer handle it."""
        select.select([self.poller.fileno()], [], [], timeout)
        self.mux.on_backend()

    def conn(self, local: int = PORT, peer: int = GPORT) -> Connection:
        return self.mux.conns[(local, peer)]

    def connect(self, buf_alloc: int = 64 * 1024) -> socket.socket:
        """A guest connection to PORT, established; returns the host's end."""
        if PORT not in self.servers:
            self.server()
        self.tx(hdr(Op.REQUEST, buf_alloc=buf_alloc))
        assert ops(self.rx()) == [Op.RESPONSE]
        return self.accept()

    def close(self) -> None:
        self.mux.close()
        self.poller.close()
        for s in [*self.accepted, *self.servers.values()]:
            s.close()
        if self.listener is not None:
            self.listener.close()


def _rx(header: bytes, payload: bytes) -> Rx:
    import struct

    return Rx(*struct.unpack("<QQIIIHHIII", header), payload=payload)


def ops(rxs: list[Rx]) -> list[Op]:
    return [Op(r.op) for r in rxs]


def watched(env: Env) -> int:
    """What the poller watches the (only) connection's host socket for."""
    sock = env.conn().sock
    assert sock is not None
    return env.poller.watching(sock.fileno())


def closed(sock: socket.socket) -> bool:
    """The peer closed: EOF, or ECONNRESET when it closed with our bytes unread."""
    try:
        return sock.recv(8) == b""
    except ConnectionResetError:
        return True


def fill_slow_host(env: Env, host: socket.socket) -> None:
    """Send the guest's data until the device holds some (the host does not read), then
    stay well inside the credit."""
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    while not env.conn().outbuf:
        env.tx(hdr(Op.RW, length=MAX_PAYLOAD), bytes(MAX_PAYLOAD))
    env.tx(hdr(Op.RW, length=MAX_PAYLOAD), bytes(MAX_PAYLOAD))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


# --- establishing ------------------------------------------------------------------------


def test_request_connects_to_uds_port(env: Env) -> None:
    env.server()
    env.tx(hdr(Op.REQUEST, buf_alloc=1234, fwd_cnt=0))
    (resp,) = env.rx()
    assert Op(resp.op) is Op.RESPONSE and (resp.src_port, resp.dst_port) == (PORT, GPORT)
    assert resp.buf_alloc == CONN_BUF_SIZE
    env.accept()
    c = env.conn()
    assert c.state is State.ESTABLISHED and c.peer_buf_alloc == 1234
    assert env.mux.stats.guest_connects == 1


def test_request_without_service_or_to_a_file_gets_rst(env: Env) -> None:
    (env.tmp / "v.sock_6000").write_text("not a socket")
    for port in (5999, 6000):
        env.tx(hdr(Op.REQUEST, dst_port=port))
        (rst,) = env.rx()
        assert Op(rst.op) is Op.RST and rst.src_port == port
    assert env.mux.conns == {} and env.mux.stats.refused == 2


def test_packets_without_a_connection(env: Env) -> None:
    for op in (Op.RW, Op.SHUTDOWN, Op.CREDIT_REQUEST, Op.RESPONSE):
        env.tx(hdr(op, length=1 if op is Op.RW else 0), b"x" if op is Op.RW else b"")
    env.tx(hdr(Op.RST))  # never answered
    assert ops(env.rx()) == [Op.RST] * 4


def test_duplicate_request_resets(env: Env) -> None:
    host = env.connect()
    env.tx(hdr(Op.REQUEST))
    assert ops(env.rx()) == [Op.RST]
    assert host.recv(8) == b""
    assert env.mux.conns == {}


# --- data and credit ---------------------------------------------------------------------


def test_guest_data_reaches_host_and_fwd_cnt_follows(env: Env) -> None:
    host = env.connect()
    env.tx(hdr(Op.RW, length=5), b"hello")
    assert host.recv(16) == b"hello"
    c = env.conn()
    assert (c.rx_cnt, c.fwd_cnt, c.buffered()) == (5, 5, 0)
    env.tx(hdr(Op.CREDIT_REQUEST))
    (upd,) = env.rx()
    assert Op(upd.op) is Op.CREDIT_UPDATE and upd.fwd_cnt == 5 and upd.buf_alloc == CONN_BUF_SIZE


def test_host_data_is_cut_to_rx_buffer_and_credit(env: Env) -> None:
    host = env.connect(buf_alloc=10_000)
    host.sendall(bytes(range(256)) * 40)  # 10240 bytes
    env.backend()
    got = env.rx(capacity=4096)
    assert [r.len for r in got] == [4096, 4096, 1808]  # 10000 = the guest's buf_alloc
    assert b"".join(r.payload for r in got) == (bytes(range(256)) * 40)[:10_000]
    assert env.conn().peer_credit() == 0
    assert watched(env) == 0  # no credit: the host socket is not read
    env.backend(0.05)
    assert env.rx() == []
    env.tx(hdr(Op.CREDIT_UPDATE, buf_alloc=10_000, fwd_cnt=4096))
    env.backend()
    (more,) = env.rx()
    assert more.len == 240  # what was left in the socket


def test_host_data_without_rx_room_stays_in_the_socket(env: Env) -> None:
    host = env.connect()
    host.sendall(b"x" * 100)
    env.backend()
    assert env.mux.has_rx()
    assert watched(env) == 0  # read only into an rx buffer
    assert env.mux.stats.rx_bytes == 0
    (r,) = env.rx()
    assert r.payload == b"x" * 100


def test_counters_wrap_at_32_bits(env: Env) -> None:
    host = env.connect()
    c = env.conn()
    c.tx_cnt = 0xFFFF_FFF0
    c.peer_fwd_cnt = 0xFFFF_FFF0
    c.peer_buf_alloc = 64
    assert c.peer_credit() == 64
    host.sendall(b"y" * 100)
    env.backend()
    (r,) = env.rx()
    assert r.len == 64 and c.tx_cnt == 0x30  # wrapped
    env.tx(hdr(Op.CREDIT_UPDATE, buf_alloc=64, fwd_cnt=0x30))
    assert c.peer_credit() == 64


def test_fwd_cnt_ahead_of_what_we_sent_gives_no_credit(env: Env) -> None:
    host = env.connect()
    env.tx(hdr(Op.CREDIT_UPDATE, buf_alloc=4096, fwd_cnt=1000))  # we sent nothing
    assert env.conn().peer_credit() == 0
    host.sendall(b"z")
    env.backend(0.05)
    assert env.rx() == []


def test_slow_host_buffers_up_to_our_credit_then_credit_updates(env: Env) -> None:
    host = env.connect()
    fill_slow_host(env, host)
    c = env.conn()
    assert c.buffered() > 0 and c.outbuf
    assert watched(env) & select.EPOLLOUT
    # fill our buffer exactly, then one more byte
    while c.buffered() < CONN_BUF_SIZE:
        n = min(CONN_BUF_SIZE - c.buffered(), MAX_PAYLOAD)
        env.tx(hdr(Op.RW, length=n), bytes(n))
    assert c.buffered() == CONN_BUF_SIZE
    with pytest.raises(HostilePacket, match="overruns the credit"):
        env.tx(hdr(Op.RW, length=1), b"!")
    # the host drains: everything arrives in order, fwd_cnt catches up, credit update
    total = c.rx_cnt
    host.setblocking(False)
    received = 0
    deadline = time.monotonic() + 5
    while received < total and time.monotonic() < deadline:
        try:
            received += len(host.recv(1 << 20))
        except BlockingIOError:
            env.backend(0.01)
    assert received == total and c.fwd_cnt == total and not c.outbuf
    (upd,) = env.rx()
    assert Op(upd.op) is Op.CREDIT_UPDATE and upd.fwd_cnt == total


def test_credit_update_threshold(env: Env) -> None:
    host = env.connect()
    small = CONN_BUF_SIZE - CREDIT_UPDATE_THRESHOLD - 1
    env.tx(hdr(Op.RW, length=min(small, MAX_PAYLOAD)), bytes(min(small, MAX_PAYLOAD)))
    host.recv(1 << 20)
    assert env.rx() == []  # the guest still sees plenty of room: no update
    sent = min(small, MAX_PAYLOAD)
    while CONN_BUF_SIZE - sent >= CREDIT_UPDATE_THRESHOLD:
        env.tx(hdr(Op.RW, length=MAX_PAYLOAD), bytes(MAX_PAYLOAD))
        sent += MAX_PAYLOAD
        while env.conn().buffered():
            host.recv(1 << 20)
            env.backend(0.01)
    got = env.rx()
    assert ops(got) == [Op.CREDIT_UPDATE] and got[0].fwd_cnt == sent


def test_every_header_carries_fwd_cnt(env: Env) -> None:
    host = env.connect()
    env.tx(hdr(Op.RW, length=3), b"abc")
    host.recv(8)
    host.sendall(b"r")
    env.backend()
    (r,) = env.rx()
    assert r.fwd_cnt == 3 and env.conn().last_fwd_sent == 3


# --- shutdown and reset -------------------------------------------------------------------


def test_guest_shutdown_send_gives_host_eof_after_the_data(env: Env) -> None:
    host = env.connect()
    env.tx(hdr(Op.RW, length=4), b"last")
    env.tx(hdr(Op.SHUTDOWN, flags=SHUTDOWN_SEND))
    assert host.recv(16) == b"last" and host.recv(16) == b""
    host.sendall(b"still flows")  # the other direction stays open
    env.backend()
    (r,) = env.rx()
    assert r.payload == b"still flows"
    env.tx(hdr(Op.RW, length=1), b"!")  # data after SHUTDOWN(SEND): reset
    assert ops(env.rx()) == [Op.RST]


def test_guest_shutdown_rcv_stops_reading_the_host(env: Env) -> None:
    host = env.connect()
    env.tx(hdr(Op.SHUTDOWN, flags=SHUTDOWN_RCV))
    with pytest.raises(BrokenPipeError):
        host.sendall(b"nobody reads this")
    env.tx(hdr(Op.RW, length=2), b"ok")  # guest -> host still works
    assert host.recv(4) == b"ok"


def test_guest_shutdown_both_flushes_then_rst(env: Env) -> None:
    host = env.connect()
    fill_slow_host(env, host)
    total = env.conn().rx_cnt
    env.tx(hdr(Op.SHUTDOWN, flags=SHUTDOWN_BOTH))
    assert env.conn().state is State.CLOSING and env.rx() == []
    received = 0
    while True:
        chunk = host.recv(1 << 20)
        if not chunk:
            break
        received += len(chunk)
        env.backend(0.01)
    assert received == total  # every byte, then EOF
    assert ops(env.rx()) == [Op.RST]
    assert env.mux.conns == {}


def test_shutdown_hints_accumulate(env: Env) -> None:
    host = env.connect()
    env.tx(hdr(Op.SHUTDOWN, flags=SHUTDOWN_RCV))
    env.tx(hdr(Op.SHUTDOWN, flags=SHUTDOWN_SEND))  # §5.10.6.5: hints are permanent
    assert ops(env.rx()) == [Op.RST]
    assert host.recv(8) == b""


def test_shutdown_both_times_out_when_the_host_never_reads(env: Env) -> None:
    host = env.connect()
    fill_slow_host(env, host)
    env.tx(hdr(Op.SHUTDOWN, flags=SHUTDOWN_BOTH))
    assert env.mux.next_deadline() == env.clock.now + CLOSE_TIMEOUT
    env.clock.now += CLOSE_TIMEOUT
    env.mux.expire()
    assert ops(env.rx()) == [Op.RST] and env.mux.conns == {}


def test_guest_rst_closes_the_host_socket_silently(env: Env) -> None:
    host = env.connect()
    env.tx(hdr(Op.RST))
    assert env.rx() == [] and env.mux.conns == {}
    assert host.recv(8) == b""


def test_host_shut_wr_sends_shutdown_send(env: Env) -> None:
    host = env.connect()
    host.sendall(b"bye")
    host.shutdown(socket.SHUT_WR)
    env.backend()
    got = env.rx()
    env.backend()  # EOF shows once the data is read
    got += env.rx()
    assert ops(got) == [Op.RW, Op.SHUTDOWN] and got[1].flags == SHUTDOWN_SEND
    env.tx(hdr(Op.RW, length=5), b"reply")  # the host can still read
    assert host.recv(8) == b"reply"
    env.tx(hdr(Op.SHUTDOWN, flags=SHUTDOWN_BOTH))
    assert ops(env.rx()) == [Op.RST]


def test_host_close_sends_shutdown_both_then_rst_after_timeout(env: Env) -> None:
    host = env.connect()
    host.close()
    env.accepted.remove(host)
    env.backend()
    (shut,) = env.rx()
    assert Op(shut.op) is Op.SHUTDOWN and shut.flags == SHUTDOWN_BOTH
    env.clock.now += CLOSE_TIMEOUT  # §5.10.6.5: the guest did not answer with RST
    env.mux.expire()
    assert ops(env.rx()) == [Op.RST] and env.mux.conns == {}


def test_host_close_then_guest_rst(env: Env) -> None:
    host = env.connect()
    host.close()
    env.accepted.remove(host)
    env.backend()
    env.rx()
    env.tx(hdr(Op.RST))
    assert env.mux.conns == {} and env.rx() == []


def test_write_to_a_vanished_host_resets(env: Env) -> None:
    host = env.connect()
    host.close()
    env.accepted.remove(host)
    env.tx(hdr(Op.RW, length=3), b"abc")
    assert Op.RST in ops(env.rx())
    assert env.mux.conns == {}


# --- host-initiated ----------------------------------------------------------------------


@pytest.fixture
def lenv(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, listener=True)
    yield e
    e.close()


def client(e: Env, line: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(str(e.uds))
    e.accepted.append(s)
    if line:
        s.sendall(line)
    e.backend()  # accept
    e.backend(0.2)  # the line
    return s


def test_connect_line_becomes_a_request_and_ok(lenv: Env) -> None:
    c = client(lenv, b"CONNECT 80\n")
    (req,) = lenv.rx()
    assert Op(req.op) is Op.REQUEST and (req.src_port, req.dst_port) == (1 << 30, 80)
    assert req.buf_alloc == CONN_BUF_SIZE
    lenv.tx(hdr(Op.RESPONSE, src_port=80, dst_port=1 << 30, buf_alloc=4096))
    assert c.recv(32) == b"OK 1073741824\n"
    conn = lenv.conn(1 << 30, 80)
    assert conn.state is State.ESTABLISHED and conn.fwd_cnt == 0  # the OK line is not counted
    lenv.tx(hdr(Op.RW, src_port=80, dst_port=1 << 30, length=2), b"hi")
    assert c.recv(8) == b"hi" and conn.fwd_cnt == 2


def test_local_ports_are_unique(lenv: Env) -> None:
    for _ in range(3):
        client(lenv, b"CONNECT 80\n")
    assert sorted(k[0] for k in lenv.mux.conns) == [1 << 30, (1 << 30) + 1, (1 << 30) + 2]


def test_guest_not_answering_times_out(lenv: Env) -> None:
    c = client(lenv, b"CONNECT 80\n")
    assert ops(lenv.rx()) == [Op.REQUEST]
    lenv.clock.now += REQUEST_TIMEOUT
    lenv.mux.expire()
    assert ops(lenv.rx()) == [Op.RST]
    assert c.recv(8) == b""


def test_only_response_or_rst_answers_a_request(lenv: Env) -> None:
    c = client(lenv, b"CONNECT 80\n")
    lenv.rx()
    lenv.tx(hdr(Op.RW, src_port=80, dst_port=1 << 30, length=1), b"x")
    assert ops(lenv.rx()) == [Op.RST]
    assert c.recv(8) == b""


@pytest.mark.parametrize(
    "line",
    [b"CONNECT\n", b"CONNECT -1\n", b"connect 5\n", b"CONNECT 5 \n", b"CONNECT 4294967296\n",
     b"CONNECT 99999999999\n", b"HELLO\n", b"x" * 40, b"CONNECT 5\r\n"],
)
def test_bad_handshakes_are_closed(lenv: Env, line: bytes) -> None:
    c = client(lenv, line)
    assert closed(c)
    assert lenv.mux.conns == {} and lenv.rx() == []
    assert lenv.listener is not None and lenv.listener.refused == 1


def test_a_line_in_pieces_does_not_spin(lenv: Env) -> None:
    c = client(lenv, b"CONN")
    r, _, _ = select.select([lenv.poller.fileno()], [], [], 0)
    assert r == []  # the partial line was consumed: nothing keeps the poller ready
    c.sendall(b"ECT 80\nafter")
    lenv.backend()
    (req,) = lenv.rx()
    assert Op(req.op) is Op.REQUEST and req.dst_port == 80
    lenv.tx(hdr(Op.RESPONSE, src_port=80, dst_port=1 << 30, buf_alloc=4096))
    assert c.recv(32) == b"OK 1073741824\n"
    lenv.backend()
    (data,) = lenv.rx()
    assert data.payload == b"after"  # nothing after the newline was eaten


def test_silent_client_times_out(lenv: Env) -> None:
    c = client(lenv, b"CONN")
    assert lenv.mux.next_deadline() is not None
    lenv.clock.now += 10
    lenv.mux.expire()
    assert closed(c)


def test_connection_limit(tmp_path: Path) -> None:
    e = Env(tmp_path, listener=True, max_connections=2)
    try:
        e.server()
        for port in (1, 2):
            e.tx(hdr(Op.REQUEST, src_port=port))
        e.tx(hdr(Op.REQUEST, src_port=3))
        assert sorted(ops(e.rx())) == [Op.RESPONSE, Op.RESPONSE, Op.RST]
        c = client(e, b"CONNECT 80\n")
        assert c.recv(8) == b""  # host clients are refused too
        assert len(e.mux.conns) == 2 and e.mux.stats.refused == 2
    finally:
        e.close()


def test_orphan_rsts_are_bounded_and_block_tx(env: Env) -> None:
    from isovisor.devices.virtio.vsock.muxer import MAX_ORPHAN_RSTS

    for i in range(MAX_ORPHAN_RSTS):
        assert not env.mux.tx_blocked
        env.tx(hdr(Op.RW, src_port=i, length=1), b"x")
    assert env.mux.tx_blocked
    assert len(env.rx(limit=1)) == 1 and not env.mux.tx_blocked


def test_connections_are_served_round_robin(env: Env) -> None:
    env.server()
    env.tx(hdr(Op.REQUEST, src_port=1))
    env.tx(hdr(Op.REQUEST, src_port=2))
    env.rx()
    a, b = env.accept(), env.accept()
    a.sendall(b"a" * 10000)
    b.sendall(b"b" * 10000)
    env.backend()
    time.sleep(0.05)
    env.backend()
    got = env.rx(capacity=1000, limit=6)
    firsts = [r.payload[:1] for r in got]
    assert firsts.count(b"a") == 3 and firsts.count(b"b") == 3
