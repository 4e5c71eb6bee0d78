"""A hostile vsock driver: each attack puts the device in NEEDS_RESET with a security event,
the host sockets of the broken device are closed, another device on the same VM memory
keeps serving, and a driver reset brings vsock back."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.device import DeviceState
from isovisor.devices.virtio.mmio import VirtioMmioTransport
from isovisor.devices.virtio.rng import VirtioRng
from isovisor.devices.virtio.vsock.connection import CONN_BUF_SIZE
from isovisor.devices.virtio.vsock.packet import MAX_PAYLOAD, Op
from isovisor.memory.layout import VIRTIO_MMIO_BASE
from tests.devices.virtio import FakeDriver, wait_for
from tests.devices.virtio.vsock_helpers import (
    RX_BUFS,
    TX_BUFS,
    VsockRig,
    hdr,
    unix_server,
)

W, N = c.DESC_F_WRITE, c.DESC_F_NEXT


def tx_raw(r: VsockRig, *descs: tuple[int, int, int, int]) -> None:
    """Descriptors (addr, len, flags, next) at 0.. of the tx table; publish head 0."""
    for i, (addr, length, flags, nxt) in enumerate(descs):
        r.g.tx.set_desc(i, addr, length, flags, nxt)
    r.g.tx.publish(0)
    r.kick(1)


def rx_raw(r: VsockRig, *descs: tuple[int, int, int, int]) -> None:
    for i, (addr, length, flags, nxt) in enumerate(descs):
        r.g.rx.set_desc(i, addr, length, flags, nxt)
    r.g.rx.publish(0)
    r.kick(0)


def spoofed_src_cid(r: VsockRig) -> None:
    r.send(hdr(Op.REQUEST, src_cid=4))


def upper_cid_bits(r: VsockRig) -> None:
    r.send(hdr(Op.REQUEST, dst_cid=(1 << 32) | 2))


def bad_op(r: VsockRig) -> None:
    r.send(hdr(99))


def op_invalid(r: VsockRig) -> None:
    r.send(hdr(0))


def len_past_the_buffer(r: VsockRig) -> None:
    r.send(hdr(Op.RW, length=100), b"only ten b")


def huge_len(r: VsockRig) -> None:
    r.mem.write_all(TX_BUFS, hdr(Op.RW, length=MAX_PAYLOAD + 1))
    tx_raw(r, (TX_BUFS, 44 + MAX_PAYLOAD + 1, 0, 0))


def payload_on_control(r: VsockRig) -> None:
    r.send(hdr(Op.REQUEST, length=4), b"abcd")


def bad_shutdown_flags(r: VsockRig) -> None:
    r.send(hdr(Op.SHUTDOWN, flags=4))


def short_header(r: VsockRig) -> None:
    r.mem.write_all(TX_BUFS, hdr(Op.REQUEST)[:40])
    tx_raw(r, (TX_BUFS, 40, 0, 0))


def tx_loop(r: VsockRig) -> None:
    r.mem.write_all(TX_BUFS, hdr(Op.REQUEST))
    tx_raw(r, (TX_BUFS, 44, N, 0))  # next = itself


def tx_outside_ram(r: VsockRig) -> None:
    tx_raw(r, (VIRTIO_MMIO_BASE, 44, 0, 0))


def tx_writable(r: VsockRig) -> None:
    r.mem.write_all(TX_BUFS, hdr(Op.REQUEST))
    tx_raw(r, (TX_BUFS, 44, N, 1), (TX_BUFS + 0x100, 16, W, 0))


def rx_readable(r: VsockRig) -> None:
    rx_raw(r, (RX_BUFS, 4096, 0, 0))
    r.send(hdr(Op.RW))  # no connection: an RST needs the rx buffer


def rx_too_small(r: VsockRig) -> None:
    rx_raw(r, (RX_BUFS, 40, W, 0))
    r.send(hdr(Op.RW))


def rx_outside_ram(r: VsockRig) -> None:
    rx_raw(r, (r.mem.size - 16, 4096, W, 0))
    r.send(hdr(Op.RW))


def credit_overrun(r: VsockRig) -> None:
    server = unix_server(r.uds.with_name("v.sock_5000"))
    try:
        r.post_rx(1)
        r.send(hdr(Op.REQUEST))
        r.wait_rx()
        conn, _ = server.accept()
        # never read from conn: guest bytes fill the socket, then the device's buffer
        r.vsock_test_conn = conn  # type: ignore[attr-defined]
        for _ in range(CONN_BUF_SIZE // MAX_PAYLOAD + 40):  # past any socket buffer too
            r.send(hdr(Op.RW, length=MAX_PAYLOAD), bytes(MAX_PAYLOAD))
            if r.vsock.state is not DeviceState.ACTIVE:
                break
            wait_for(lambda: r.g.tx.used_idx() == r.g._tx_slot & 0xFFFF, 2)
    finally:
        server.close()


ATTACKS: dict[str, tuple[Callable[[VsockRig], None], str]] = {
    "spoofed-src-cid": (spoofed_src_cid, "guest's CID is 3"),
    "upper-cid-bits": (upper_cid_bits, "reserved upper bits"),
    "bad-op": (bad_op, "unknown op 99"),
    "op-invalid": (op_invalid, "unknown op 0"),
    "len-past-buffer": (len_past_the_buffer, "len 100 but only 10"),
    "huge-len": (huge_len, "exceeds the 65536-byte"),
    "payload-on-control": (payload_on_control, "REQUEST packet carries"),
    "shutdown-flags": (bad_shutdown_flags, "undefined bits"),
    "short-header": (short_header, "cannot hold a 44-byte header"),
    "tx-loop": (tx_loop, "hops"),
    "tx-outside-ram": (tx_outside_ram, "not RAM"),
    "tx-writable": (tx_writable, "device-writable buffer in a tx packet"),
    "rx-readable": (rx_readable, "device-readable buffer in an rx buffer"),
    "rx-too-small": (rx_too_small, "cannot hold a 44-byte header"),
    "rx-outside-ram": (rx_outside_ram, "runs past RAM"),
    "credit-overrun": (credit_overrun, "overruns the credit"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_needs_reset_and_others_keep_running(tmp_path: Path, attack: str) -> None:
    run_attack, detail = ATTACKS[attack]
    r = VsockRig(tmp_path)
    rng = VirtioRng(r.events)
    rng_t = VirtioMmioTransport(
        rng, r.mem, base=VIRTIO_MMIO_BASE + 0x1000, gsi=17, eventfds=r.fds, events=r.events
    )
    rng_q = FakeDriver(r.mem, 16, desc=0x40000, avail=0x41000, used=0x42000)
    try:
        r.bring_up()
        _bring_up_rng(rng_t, rng_q)
        run_attack(r)
        assert wait_for(lambda: r.rd(c.MMIO_STATUS) & c.STATUS_DEVICE_NEEDS_RESET), attack
        assert r.vsock.state is DeviceState.BROKEN
        (ev,) = r.events.events()
        assert ev.kind == "virtio-needs-reset"
        assert ev.source == f"virtio-vsock@{VIRTIO_MMIO_BASE:#x}"
        assert detail in ev.detail, ev.detail
        # another device on the same memory and event fds is unaffected
        rng_q.writable_chain(0, 0x600000, 32)
        rng_q.publish(0)
        os.eventfd_write(rng_t.notify_fds[0], 1)
        assert wait_for(lambda: rng_q.used_idx() == 1)
        assert rng.state is DeviceState.ACTIVE
        # the driver resets vsock and it works again
        r.status(0)
        r.g = type(r.g)(r)
        r.got.clear()
        r.bring_up()
        r.post_rx(1)
        r.send(hdr(Op.REQUEST, dst_port=4444))
        (rst,) = r.wait_rx()
        assert Op(rst.op) is Op.RST and r.vsock.state is DeviceState.ACTIVE
    finally:
        conn = getattr(r, "vsock_test_conn", None)
        if conn is not None:
            conn.close()
        rng_t.close()
        r.close()


def _bring_up_rng(t: VirtioMmioTransport, q: FakeDriver) -> None:
    def wr(off: int, v: int) -> None:
        t.write(off, (v & 0xFFFF_FFFF).to_bytes(4, "little"))

    for s in (0, 1, 3):
        wr(c.MMIO_STATUS, s)
    wr(c.MMIO_DRIVER_FEATURES_SEL, 1)
    wr(c.MMIO_DRIVER_FEATURES, 1)
    wr(c.MMIO_STATUS, 0x0B)
    wr(c.MMIO_QUEUE_SEL, 0)
    wr(c.MMIO_QUEUE_NUM, 16)
    wr(c.MMIO_QUEUE_DESC_LOW, q.desc)
    wr(c.MMIO_QUEUE_DRIVER_LOW, q.avail)
    wr(c.MMIO_QUEUE_DEVICE_LOW, q.used)
    wr(c.MMIO_QUEUE_READY, 1)
    wr(c.MMIO_STATUS, 0x0F)
    assert t.status == 0x0F


def test_broken_device_closes_its_host_sockets(tmp_path: Path) -> None:
    r = VsockRig(tmp_path)
    server = unix_server(tmp_path / "v.sock_5000")
    try:
        r.bring_up()
        r.post_rx(1)
        r.send(hdr(Op.REQUEST))
        r.wait_rx()
        conn, _ = server.accept()
        with conn:
            r.send(hdr(77))
            assert wait_for(lambda: r.vsock.state is DeviceState.BROKEN)
            conn.settimeout(1)
            r.status(0)  # the driver's reset tears the connections down
            assert conn.recv(16) == b""
    finally:
        server.close()
        r.close()
