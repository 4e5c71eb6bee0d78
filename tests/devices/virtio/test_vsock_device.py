"""virtio-vsock through the virtio-mmio transport and the device's I/O thread: identity
and config, a guest-initiated round trip, a host-initiated one, no host-side buffering
without rx buffers or credit, reset, and the factory's errors."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.devices.events import SecurityEventLog
from isovisor.devices.virtio.device import DeviceState
from isovisor.devices.virtio.vsock import VsockConfigError, VsockSpec, open_vsock
from isovisor.devices.virtio.vsock.connection import CONN_BUF_SIZE
from isovisor.devices.virtio.vsock.device import F_STREAM, VirtioVsock
from isovisor.devices.virtio.vsock.packet import SHUTDOWN_BOTH, Op
from tests.devices.virtio import wait_for
from tests.devices.virtio.vsock_helpers import (
    GUEST_CID,
    HOST_CID,
    VsockRig,
    hdr,
    rx_ops,
    unix_server,
)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[VsockRig]:
    r = VsockRig(tmp_path)
    try:
        r.bring_up()
        yield r
    finally:
        r.close()


def test_identity_and_config(tmp_path: Path) -> None:
    dev = VirtioVsock(SecurityEventLog(), cid=0x1234_5678)
    assert dev.device_type == 19 and len(dev.queue_max_sizes) == 3  # §5.10.1, §5.10.2
    assert dev.device_features() == F_STREAM
    assert dev.read_config(0, 8) == struct.pack("<Q", 0x1234_5678)  # §5.10.4
    assert dev.read_config(4, 4) == bytes(4)  # upper 32 bits zero
    with pytest.raises(ValueError, match="reserved"):
        VirtioVsock(SecurityEventLog(), cid=2)


def test_guest_connects_sends_receives_and_closes(rig: VsockRig, tmp_path: Path) -> None:
    server = unix_server(tmp_path / "v.sock_5000")
    try:
        rig.post_rx(4)
        rig.send(hdr(Op.REQUEST, buf_alloc=4096))
        (resp,) = rig.wait_rx()
        assert Op(resp.op) is Op.RESPONSE
        assert (resp.src_cid, resp.dst_cid) == (HOST_CID, GUEST_CID)
        assert (resp.src_port, resp.dst_port) == (5000, 1000)
        assert resp.buf_alloc == CONN_BUF_SIZE and resp.fwd_cnt == 0
        conn, _ = server.accept()
        with conn:
            rig.send(hdr(Op.RW, length=4, buf_alloc=4096), b"ping")
            assert conn.recv(16) == b"ping"
            conn.sendall(b"pong")
            (data,) = rig.wait_rx()
            assert Op(data.op) is Op.RW and data.payload == b"pong" and data.len == 4
            assert data.fwd_cnt == 4  # the host took "ping"
            rig.send(hdr(Op.SHUTDOWN, flags=SHUTDOWN_BOTH, buf_alloc=4096, fwd_cnt=4))
            (rst,) = rig.wait_rx()
            assert Op(rst.op) is Op.RST
            assert conn.recv(16) == b""  # the host sees EOF
        assert wait_for(lambda: not rig.vsock.muxer or not rig.vsock.muxer.conns)
        assert rig.events.events() == []
    finally:
        server.close()


def test_guest_connect_without_a_host_service_gets_rst(rig: VsockRig) -> None:
    rig.post_rx(1)
    rig.send(hdr(Op.REQUEST, dst_port=4444))
    (rst,) = rig.wait_rx()
    assert Op(rst.op) is Op.RST and rst.src_port == 4444 and rst.dst_port == 1000
    assert rig.vsock.vsock_stats.refused == 1


def test_host_initiated_connection(rig: VsockRig) -> None:
    rig.post_rx(4)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        client.connect(str(rig.uds))
        client.sendall(b"CONNECT 52\nearly")  # bytes after the line wait for the guest
        (req,) = rig.wait_rx()
        assert Op(req.op) is Op.REQUEST and req.dst_port == 52 and req.src_port == 1 << 30
        rig.send(hdr(Op.RESPONSE, src_port=52, dst_port=req.src_port))
        assert client.recv(64) == f"OK {1 << 30}\n".encode()
        (data,) = rig.wait_rx()
        assert Op(data.op) is Op.RW and data.payload == b"early"
        rig.send(hdr(Op.RW, src_port=52, dst_port=req.src_port, length=5), b"hello")
        assert client.recv(64) == b"hello"
    finally:
        client.close()
    (shut,) = rig.wait_rx()  # the host closed: SHUTDOWN(RCV|SEND)
    assert Op(shut.op) is Op.SHUTDOWN and shut.flags == SHUTDOWN_BOTH


def test_host_initiated_refused_by_the_guest_closes_the_client(rig: VsockRig) -> None:
    rig.post_rx(1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(rig.uds))
        client.sendall(b"CONNECT 9\n")
        (req,) = rig.wait_rx()
        rig.send(hdr(Op.RST, src_port=9, dst_port=req.src_port))
        assert client.recv(64) == b""  # closed, no OK line


def test_no_rx_buffers_means_the_host_socket_is_not_read(rig: VsockRig, tmp_path: Path) -> None:
    """Without rx buffers nothing is read from the host: its writes block in the kernel,
    and the device holds no copy."""
    server = unix_server(tmp_path / "v.sock_5000")
    try:
        rig.post_rx(1)
        rig.send(hdr(Op.REQUEST, buf_alloc=1 << 20))
        rig.wait_rx()
        conn, _ = server.accept()
        with conn:
            conn.setblocking(False)
            sent = 0
            try:
                while True:
                    sent += conn.send(bytes(65536))
            except BlockingIOError:
                pass
            time.sleep(0.1)
            assert rig.vsock.vsock_stats.rx_bytes == 0
            assert sent < 4 * 1024 * 1024  # the kernel's socket buffer, not ours, filled
            rig.post_rx(2)
            got = rig.wait_rx(2)
            assert [r.len for r in got] == [4096, 4096]  # one rx buffer each
    finally:
        server.close()


def test_host_data_waits_for_credit(rig: VsockRig, tmp_path: Path) -> None:
    server = unix_server(tmp_path / "v.sock_5000")
    try:
        rig.post_rx(8)
        rig.send(hdr(Op.REQUEST, buf_alloc=100))
        rig.wait_rx()
        conn, _ = server.accept()
        with conn:
            conn.sendall(bytes(300))
            (a,) = rig.wait_rx()
            assert a.len == 100  # all the credit the guest gave
            time.sleep(0.1)
            assert rig.g.received() == []  # nothing more until the guest frees space
            rig.send(hdr(Op.CREDIT_UPDATE, buf_alloc=100, fwd_cnt=100))
            (b,) = rig.wait_rx()
            assert b.len == 100
    finally:
        server.close()


def test_reset_closes_every_host_socket(rig: VsockRig, tmp_path: Path) -> None:
    server = unix_server(tmp_path / "v.sock_5000")
    try:
        rig.post_rx(1)
        rig.send(hdr(Op.REQUEST))
        rig.wait_rx()
        conn, _ = server.accept()
        with conn:
            rig.status(0)
            assert rig.vsock.state is DeviceState.INACTIVE
            assert conn.recv(16) == b""
        # the listener survives a driver reset: a new driver gets host connections again
        rig.bring_up()
        rig.post_rx(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(rig.uds))
            client.sendall(b"CONNECT 7\n")
            (req,) = rig.wait_rx()
            assert Op(req.op) is Op.REQUEST
    finally:
        server.close()


def test_unroutable_packets_get_rst_and_the_device_carries_on(rig: VsockRig) -> None:
    rig.post_rx(2)
    rig.send(hdr(Op.REQUEST, dst_cid=7))  # another CID: guest userspace can ask for it
    rig.send(hdr(Op.REQUEST, type_=2))  # SEQPACKET, never offered (§5.10.6.4: RST)
    got = rig.wait_rx(2)
    assert rx_ops(got) == [Op.RST, Op.RST]
    assert got[0].src_cid == 7  # the RST comes from the address the guest asked for
    assert rig.vsock.state is DeviceState.ACTIVE and rig.events.events() == []


def test_factory_errors(tmp_path: Path) -> None:
    ev = SecurityEventLog()
    for cid in (0, 1, 2, 0xFFFF_FFFF, 1 << 32):
        with pytest.raises(VsockConfigError, match="reserved"):
            open_vsock(VsockSpec(cid, tmp_path / "a.sock"), ev)
    with pytest.raises(VsockConfigError, match="does not exist"):
        open_vsock(VsockSpec(3, tmp_path / "missing" / "a.sock"), ev)
    with pytest.raises(VsockConfigError, match="bytes"):
        open_vsock(VsockSpec(3, tmp_path / ("x" * 120)), ev)
    (tmp_path / "taken").write_text("")
    with pytest.raises(VsockConfigError, match="already exists"):
        open_vsock(VsockSpec(3, tmp_path / "taken"), ev)
    dev = open_vsock(VsockSpec(3, tmp_path / "ok.sock"), ev)
    assert (tmp_path / "ok.sock").stat().st_mode & 0o777 == 0o600
    dev.close()
    assert not (tmp_path / "ok.sock").exists()


def test_a_megabyte_each_way_under_credit(rig: VsockRig, tmp_path: Path) -> None:
    """The guest side plays a Linux-like driver: 64 KiB of receive space, credit updates as
    it consumes, and sends only within the credit the device advertises."""
    size = 1 << 20
    down = bytes((i * 7) & 0xFF for i in range(size))  # host -> guest
    up = bytes((i * 13) & 0xFF for i in range(size))  # guest -> host
    server = unix_server(tmp_path / "v.sock_5000")
    try:
        window = 64 * 1024
        rig.post_rx(8)
        rig.send(hdr(Op.REQUEST, buf_alloc=window))
        (resp,) = rig.wait_rx()
        peer_alloc, peer_fwd = resp.buf_alloc, resp.fwd_cnt
        conn, _ = server.accept()
        with conn:
            conn.setblocking(False)
            received, sent, host_got = bytearray(), 0, bytearray()
            host_sent = 0
            update = False
            deadline = time.monotonic() + 60
            while (len(received) < size or len(host_got) < size) and time.monotonic() < deadline:
                if host_sent < size:  # the host writes what its socket takes
                    try:
                        host_sent += conn.send(down[host_sent : host_sent + 65536])
                    except BlockingIOError:
                        pass
                try:  # the host reads
                    host_got += conn.recv(1 << 20)
                except BlockingIOError:
                    pass
                credit = peer_alloc - (sent - peer_fwd)  # §5.10.6.3
                n = min(credit, size - sent, 32 * 1024)
                tx_idle = rig.g.tx.used_idx() == rig.g._tx_slot & 0xFFFF  # one packet at a time
                if tx_idle and n > 0:  # every header carries our fwd_cnt: a credit update too
                    rig.send(hdr(Op.RW, length=n, buf_alloc=window, fwd_cnt=len(received)),
                             up[sent : sent + n])
                    sent += n
                    update = False
                elif tx_idle and update:
                    rig.send(hdr(Op.CREDIT_UPDATE, buf_alloc=window, fwd_cnt=len(received)))
                    update = False
                got = rig.g.received()
                for r in got:
                    if Op(r.op) is Op.RW:
                        received += r.payload
                    peer_alloc, peer_fwd = r.buf_alloc, r.fwd_cnt
                if got:
                    rig.post_rx(len(got))
                    update = True
                if not got and n <= 0:
                    time.sleep(0.001)
            assert bytes(received) == down and bytes(host_got) == up
            c = rig.vsock.muxer.conns[(5000, 1000)] if rig.vsock.muxer else None
            assert c is not None and c.tx_cnt == size and c.fwd_cnt == size
    finally:
        server.close()
    assert rig.events.events() == []
