"""virtio-blk: every request type, every bad request, read-only enforcement, hostile chains,
config space and features, and the rate limiter deferring (never dropping) requests."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.devices.events import SecurityEventLog
from isovisor.devices.ratelimit import BucketSpec, RateLimiter
from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.blk import (
    F_BLK_SIZE,
    F_DISCARD,
    F_FLUSH,
    F_RO,
    F_SEG_MAX,
    F_WRITE_ZEROES,
    MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS,
    SEG_MAX,
    VirtioBlk,
    open_disk,
)
from isovisor.devices.virtio.blk_disk import DiskSpec
from isovisor.devices.virtio.blk_request import RequestType as T
from isovisor.devices.virtio.chain import GuestProtocolError
from isovisor.devices.virtio.device import DeviceState
from isovisor.memory import GuestMemory
from isovisor.memory.layout import MiB
from tests.devices.virtio import BUF_ADDR, Rig, wait_for
from tests.devices.virtio.blk_helpers import BlkSetup, N, W, make_image, sector_bytes

OK, IOERR, UNSUPP = 0, 1, 2


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img")


@pytest.fixture
def blk(mem: GuestMemory, image: Path) -> Iterator[BlkSetup]:
    b = BlkSetup(mem, image)
    yield b
    b.close()


# --- identity, features, config ----------------------------------------------------------


def test_identity_features_and_config(blk: BlkSetup) -> None:
    dev = blk.dev
    assert dev.device_type == 2 and dev.queue_max_sizes == (256,)
    f = dev.device_features()
    assert f & F_SEG_MAX and f & F_BLK_SIZE and f & F_FLUSH
    assert f & F_DISCARD and f & F_WRITE_ZEROES and not f & F_RO
    cfg = dev.config_space()
    assert len(cfg) == 60
    capacity, _size_max, seg_max = struct.unpack_from("<QII", cfg, 0)
    assert capacity == 2048 and seg_max == SEG_MAX < 256
    assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
    assert struct.unpack_from("<H", cfg, 34)[0] == 1  # num_queues
    max_disc, max_disc_seg, align, max_wz, max_wz_seg = struct.unpack_from("<5I", cfg, 36)
    assert (max_disc_seg, max_wz) == (MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS)
    assert max_disc > 0 and align == 8 and max_wz_seg > 0 and cfg[56] == 1


def test_readonly_offers_ro_and_no_write_features(mem: GuestMemory, image: Path) -> None:
    b = BlkSetup(mem, image, readonly=True)
    try:
        f = b.dev.device_features()
        assert f & F_RO and not f & (F_DISCARD | F_WRITE_ZEROES)
    finally:
        b.close()


# --- IN / OUT / FLUSH / GET_ID --------------------------------------------------------------


def test_read_one_sector(blk: BlkSetup, mem: GuestMemory) -> None:
    s = blk.simple(0, T.IN, 5, 512, writable_data=True)
    blk.run(0)
    assert blk.status(s) == OK and blk.used(0) == (0, 513)
    assert mem.read_exact(s.data, 512) == sector_bytes(5)
    assert blk.dev.blk_stats.reads == 1 and blk.dev.blk_stats.bytes_read == 512


def test_read_scattered_over_many_descriptors(blk: BlkSetup, mem: GuestMemory) -> None:
    """Data split 100 + 412 + 512 bytes, the header split 4 + 12: §2.6.4 framing."""
    s = blk.slot(0)
    blk.header(s, T.IN, 10)
    d = blk.d
    d.set_desc(0, s.header, 4, N, 1)
    d.set_desc(1, s.header + 4, 12, N, 2)
    d.set_desc(2, s.data, 100, N | W, 3)
    d.set_desc(3, s.data + 0x1000, 412, N | W, 4)
    d.set_desc(4, s.data + 0x2000, 512, N | W, 5)
    d.set_desc(5, s.status, 1, W)
    blk.run(0)
    assert blk.status(s) == OK and blk.used(0) == (0, 1025)
    got = mem.read_exact(s.data, 100) + mem.read_exact(s.data + 0x1000, 412)
    assert got == sector_bytes(10)
    assert mem.read_exact(s.data + 0x2000, 512) == sector_bytes(11)


def test_status_shares_the_last_writable_descriptor(blk: BlkSetup, mem: GuestMemory) -> None:
    s = blk.slot(0)
    blk.header(s, T.IN, 3)
    blk.d.set_desc(0, s.header, 16, N, 1)
    blk.d.set_desc(1, s.data, 513, W)  # data and status in one buffer
    blk.run(0)
    assert mem.read_exact(s.data, 512) == sector_bytes(3)
    assert mem.read_u8(s.data + 512) == OK and blk.used(0) == (0, 513)


def test_write_then_read_back(blk: BlkSetup, mem: GuestMemory, image: Path) -> None:
    s = blk.simple(0, T.OUT, 7, 1024, writable_data=False)
    mem.write_all(s.data, b"\xab" * 1024)
    blk.run(0)
    assert blk.status(s) == OK and blk.used(0) == (0, 1)
    assert image.read_bytes()[7 * 512 : 9 * 512] == b"\xab" * 1024
    r = blk.simple(3, T.IN, 7, 1024, writable_data=True)
    blk.run(3)
    assert mem.read_exact(r.data, 1024) == b"\xab" * 1024
    assert blk.dev.blk_stats.writes == 1 and blk.dev.blk_stats.bytes_written == 1024


def test_flush(blk: BlkSetup) -> None:
    s = blk.simple(0, T.FLUSH, 0, 0, writable_data=False)
    blk.run(0)
    assert blk.status(s) == OK and blk.used(0) == (0, 1)
    assert blk.dev.blk_stats.flushes == 1


def test_write_through_without_negotiated_flush(mem: GuestMemory, image: Path) -> None:
    b = BlkSetup(mem, image, features=F_SEG_MAX)
    calls: list[int] = []
    real = b.dev.disk.flush

    def counted() -> None:
        calls.append(1)
        real()

    b.dev.disk.flush = counted  # type: ignore[method-assign]
    try:
        b.simple(0, T.OUT, 0, 512, writable_data=False)
        b.run(0)
        assert calls == [1]
    finally:
        b.close()


def test_get_id(mem: GuestMemory, image: Path) -> None:
    b = BlkSetup(mem, image, serial="isovisor-disk-0")
    try:
        s = b.simple(0, T.GET_ID, 0, 20, writable_data=True)
        b.run(0)
        assert b.status(s) == OK and b.used(0) == (0, 21)
        assert mem.read_exact(s.data, 20) == b"isovisor-disk-0".ljust(20, b"\0")
    finally:
        b.close()


def test_default_serial_is_stable_and_20_bytes(blk: BlkSetup) -> None:
    assert len(blk.dev.disk.serial) == 20 and blk.dev.disk.serial.strip(b"\0")


def test_get_id_short_buffer_gets_a_prefix(mem: GuestMemory, image: Path) -> None:
    b = BlkSetup(mem, image, serial="abcdefghijklmnopqrst")
    try:
        s = b.simple(0, T.GET_ID, 0, 8, writable_data=True)
        b.run(0)
        assert mem.read_exact(s.data, 8) == b"abcdefgh" and b.used(0) == (0, 9)
    finally:
        b.close()


# --- DISCARD / WRITE_ZEROES ----------------------------------------------------------------


def segments(blk: BlkSetup, head: int, rtype: int, segs: list[tuple[int, int, int]]) -> int:
    s = blk.slot(head)
    blk.header(s, rtype, 0)
    raw = b"".join(struct.pack("<QII", *seg) for seg in segs)
    blk.mem.write_all(s.data, raw)
    blk.d.set_desc(head, s.header, 16, N, head + 1)
    blk.d.set_desc(head + 1, s.data, len(raw), N, head + 2)
    blk.d.set_desc(head + 2, s.status, 1, W)
    blk.run(head)
    return blk.status(s)


def test_write_zeroes_and_discard(blk: BlkSetup, image: Path) -> None:
    assert segments(blk, 0, T.WRITE_ZEROES, [(8, 16, 0), (100, 8, 1)]) == OK
    data = image.read_bytes()
    assert data[8 * 512 : 24 * 512] == bytes(16 * 512)
    assert data[100 * 512 : 108 * 512] == bytes(8 * 512)
    assert data[24 * 512 : 25 * 512] == sector_bytes(24)
    assert segments(blk, 3, T.DISCARD, [(200, 8, 0)]) == OK
    assert blk.dev.blk_stats.write_zeroes == 1 and blk.dev.blk_stats.discards == 1


def test_write_zeroes_falls_back_to_writing_zeros(blk: BlkSetup, image: Path) -> None:
    import isovisor.devices.virtio.blk_disk as disk_mod

    real = disk_mod._fallocate
    disk_mod._fallocate = lambda *a: 95  # EOPNOTSUPP
    try:
        assert segments(blk, 0, T.WRITE_ZEROES, [(40, 3, 0)]) == OK
    finally:
        disk_mod._fallocate = real
    data = image.read_bytes()
    assert data[40 * 512 : 43 * 512] == bytes(3 * 512)
    assert data[43 * 512 : 44 * 512] == sector_bytes(43)


@pytest.mark.parametrize(
    ("rtype", "segs", "status"),
    [
        (T.DISCARD, [(0, 8, 1)], UNSUPP),  # §5.2.6.2: unmap flag on a discard
        (T.WRITE_ZEROES, [(0, 8, 2)], UNSUPP),  # reserved flag bit
        (T.WRITE_ZEROES, [(2040, 16, 0)], IOERR),  # past the end
        (T.WRITE_ZEROES, [((1 << 64) - 2, 8, 0)], IOERR),  # sector * 512 overflows u64
        (T.WRITE_ZEROES, [(0, MAX_WRITE_ZEROES_SECTORS + 1, 0)], IOERR),  # too many sectors
        (T.DISCARD, [(0, 1, 0)] * (MAX_DISCARD_SEG + 1), IOERR),  # too many segments
    ],
)
def test_bad_segments(
    blk: BlkSetup, image: Path, rtype: int, segs: list[tuple[int, int, int]], status: int
) -> None:
    before = image.read_bytes()
    blk.d = type(blk.d)(blk.mem, 16)
    assert segments(blk, 0, rtype, segs) == status
    assert image.read_bytes() == before
    assert blk.dev.blk_stats.bad_requests == 1


def test_segment_table_not_whole_segments(blk: BlkSetup) -> None:
    s = blk.slot(0)
    blk.header(s, T.DISCARD, 0)
    blk.d.set_desc(0, s.header, 16, N, 1)
    blk.d.set_desc(1, s.data, 20, N, 2)
    blk.d.set_desc(2, s.status, 1, W)
    blk.run(0)
    assert blk.status(s) == IOERR


def test_discard_not_negotiated_is_unsupported(mem: GuestMemory, image: Path) -> None:
    b = BlkSetup(mem, image, features=F_FLUSH)
    try:
        assert segments(b, 0, T.DISCARD, [(0, 8, 0)]) == UNSUPP
        assert segments(b, 3, T.WRITE_ZEROES, [(0, 8, 0)]) == UNSUPP
    finally:
        b.close()


# --- bad requests: the request fails, the device carries on --------------------------------


def test_unknown_and_unsupported_types(blk: BlkSetup) -> None:
    a = blk.simple(0, 99, 0, 0, writable_data=False)
    b = blk.simple(3, T.GET_LIFETIME, 0, 0, writable_data=False)
    blk.run(0, 3)
    assert blk.status(a) == UNSUPP and blk.status(b) == UNSUPP
    assert blk.used(0) == (0, 1) and blk.used(1) == (3, 1)


@pytest.mark.parametrize(
    ("sector", "length"),
    [
        (2048, 512),  # first sector past the end
        (2047, 1024),  # straddles the end
        ((1 << 64) - 1, 512),  # sector * 512 overflows u64
        ((1 << 55), 512),  # sector * 512 + len overflows u64
    ],
    ids=["past-end", "straddles-end", "mul-overflow", "add-overflow"],
)
def test_out_of_range_sectors(blk: BlkSetup, mem: GuestMemory, sector: int, length: int) -> None:
    s = blk.simple(0, T.IN, sector, length, writable_data=True)
    mem.fill(s.data, length, 0x5A)
    blk.run(0)
    assert blk.status(s) == IOERR and blk.used(0) == (0, 1)
    assert mem.read_exact(s.data, length) == b"\x5a" * length  # nothing read


def test_odd_length(blk: BlkSetup, image: Path) -> None:
    before = image.read_bytes()
    a = blk.simple(0, T.IN, 0, 500, writable_data=True)
    b = blk.simple(3, T.OUT, 0, 513, writable_data=False)
    blk.run(0, 3)
    assert blk.status(a) == IOERR and blk.status(b) == IOERR
    assert image.read_bytes() == before


def test_data_in_the_wrong_direction(blk: BlkSetup, image: Path) -> None:
    before = image.read_bytes()
    a = blk.simple(0, T.IN, 0, 512, writable_data=False)  # read into a readable buffer
    b = blk.simple(3, T.OUT, 0, 512, writable_data=True)  # write from a writable one
    blk.run(0, 3)
    assert blk.status(a) == IOERR and blk.status(b) == IOERR
    assert image.read_bytes() == before


def test_missing_status(blk: BlkSetup) -> None:
    """Header and data, no device-writable byte at all: completed with nothing written."""
    s = blk.slot(0)
    blk.header(s, T.OUT, 0)
    blk.d.set_desc(0, s.header, 16, N, 1)
    blk.d.set_desc(1, s.data, 512, 0)
    ok = blk.simple(3, T.FLUSH, 0, 0, writable_data=False)
    blk.run(0, 3)
    assert blk.used(0) == (0, 0) and blk.status(s) == 0xEE
    assert blk.status(ok) == OK and blk.used(1) == (3, 1)  # the device carried on
    assert blk.dev.blk_stats.no_status == 1


def test_status_descriptor_not_writable(blk: BlkSetup) -> None:
    s = blk.slot(0)
    blk.header(s, T.FLUSH, 0)
    blk.d.set_desc(0, s.header, 16, N, 1)
    blk.d.set_desc(1, s.status, 1, 0)  # the "status" is device-readable
    blk.run(0)
    assert blk.used(0) == (0, 0) and blk.status(s) == 0xEE


def test_header_not_readable(blk: BlkSetup) -> None:
    s = blk.slot(0)
    blk.header(s, T.IN, 0)
    blk.d.set_desc(0, s.header, 16, N | W, 1)  # the header is device-writable
    blk.d.set_desc(1, s.status, 1, W)
    blk.run(0)
    assert blk.status(s) == IOERR and blk.used(0) == (0, 1)
    assert blk.mem.read_exact(s.header, 4) == struct.pack("<I", T.IN)  # not overwritten


def test_short_header(blk: BlkSetup) -> None:
    s = blk.slot(0)
    blk.header(s, T.IN, 0)
    blk.d.set_desc(0, s.header, 8, N, 1)
    blk.d.set_desc(1, s.status, 1, W)
    blk.run(0)
    assert blk.status(s) == IOERR


def test_too_few_descriptors(blk: BlkSetup) -> None:
    """A lone header descriptor: no status, no data."""
    s = blk.slot(0)
    blk.header(s, T.IN, 0)
    blk.d.set_desc(0, s.header, 16, 0)
    blk.run(0)
    assert blk.used(0) == (0, 0)


def test_flush_with_data_is_a_bad_request(blk: BlkSetup) -> None:
    s = blk.simple(0, T.FLUSH, 0, 512, writable_data=False)
    blk.run(0)
    assert blk.status(s) == IOERR


# --- read-only ------------------------------------------------------------------------------


@pytest.mark.parametrize("features", [None, F_FLUSH | F_DISCARD | F_WRITE_ZEROES])
def test_readonly_refuses_writes_even_if_the_driver_ignores_ro(
    mem: GuestMemory, image: Path, features: int | None
) -> None:
    before = image.read_bytes()
    b = BlkSetup(mem, image, readonly=True, features=features)
    try:
        w = b.simple(0, T.OUT, 0, 512, writable_data=False)
        mem.write_all(w.data, b"\xff" * 512)
        b.run(0)
        assert b.status(w) == IOERR
        b.d = type(b.d)(mem, 16)
        b.q = type(b.q)(mem, b.d.config())
        for head, rtype in ((0, T.DISCARD), (3, T.WRITE_ZEROES)):
            assert segments(b, head, rtype, [(0, 8, 0)]) == IOERR
        r = b.simple(6, T.IN, 0, 512, writable_data=True)
        f = b.simple(9, T.FLUSH, 0, 0, writable_data=False)
        b.run(6, 9)
        assert b.status(r) == OK and b.status(f) == OK  # reads and flushes still work
    finally:
        b.close()
    assert image.read_bytes() == before


def test_readonly_fd_cannot_write(mem: GuestMemory, image: Path) -> None:
    b = BlkSetup(mem, image, readonly=True)
    try:
        with pytest.raises(OSError):
            os.write(b.dev.disk.fd, b"x")
    finally:
        b.close()


def test_host_io_error_is_ioerr(blk: BlkSetup, mem: GuestMemory) -> None:
    os.truncate(blk.dev.disk.path, 512)  # the image shrank under the VM
    s = blk.simple(0, T.IN, 100, 512, writable_data=True)
    blk.run(0)
    assert blk.status(s) == IOERR and blk.dev.blk_stats.io_errors == 1


# --- hostile chains -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["loop", "outside-ram", "huge-length", "bad-next", "bad-head"])
def test_hostile_chains_raise_protocol_errors(blk: BlkSetup, mem: GuestMemory, case: str) -> None:
    s = blk.slot(0)
    blk.header(s, T.IN, 0)
    d = blk.d
    if case == "loop":
        d.set_desc(0, s.header, 16, N, 1)
        d.set_desc(1, s.data, 512, N | W, 0)
    elif case == "outside-ram":
        d.set_desc(0, s.header, 16, N, 1)
        d.set_desc(1, 0xE000_0000, 512, N | W, 2)
        d.set_desc(2, s.status, 1, W)
    elif case == "huge-length":
        d.set_desc(0, s.header, 16, N, 1)
        d.set_desc(1, s.data, 0xFFFF_F000, N | W, 2)
        d.set_desc(2, s.status, 1, W)
    elif case == "bad-next":
        d.set_desc(0, s.header, 16, N, 500)
    else:
        d.publish(40)
        with pytest.raises(GuestProtocolError):
            blk.dev.process_queue(0, blk.q)
        return
    d.publish(0)
    with pytest.raises(GuestProtocolError):
        blk.dev.process_queue(0, blk.q)
    assert d.used_idx() == 0
    assert mem.read_u8(s.status) == 0xEE


# --- through the transport and the I/O thread ------------------------------------------


def rig_request(r: Rig, head: int, rtype: int, sector: int, length: int) -> int:
    base = BUF_ADDR + head * 0x20000
    r.mem.write_all(base, struct.pack("<IIQ", rtype, 0, sector))
    r.q.set_desc(head, base, 16, N, head + 1)
    r.q.set_desc(head + 1, base + 0x1000, length, N | (W if rtype == T.IN else 0), head + 2)
    r.q.set_desc(head + 2, base + 0x100, 1, W)
    return base


def test_hostile_chain_through_the_thread_needs_reset(image: Path) -> None:
    events = SecurityEventLog()
    r = Rig(open_disk(DiskSpec(image), events))
    try:
        r.bring_up()
        r.q.set_desc(0, BUF_ADDR, 16, N, 0)  # a loop
        r.q.publish(0)
        os.eventfd_write(r.t.notify_fds[0], 1)
        assert wait_for(lambda: r.dev.state is DeviceState.BROKEN)
        assert r.rd(c.MMIO_STATUS) & c.STATUS_DEVICE_NEEDS_RESET
        (ev,) = events.events()
        assert ev.kind == "virtio-needs-reset" and "hops" in ev.detail
        assert ev.source.startswith("virtio-blk@")
    finally:
        r.close()
        assert isinstance(r.dev, VirtioBlk)
        r.dev.disk.close()


def test_rate_limiter_defers_then_serves(mem: GuestMemory, image: Path) -> None:
    now = [0.0]
    lim = RateLimiter(BucketSpec(1024, 1024.0), clock=lambda: now[0])
    b = BlkSetup(mem, image, limiter=lim)
    try:
        for h in (0, 3, 6):
            b.simple(h, T.IN, h, 512, writable_data=True)
        b.d.publish(0, 3, 6)
        assert not b.dev.process_queue(0, b.q)  # two served, the third waits
        assert b.d.used_idx() == 2
        assert b.dev.next_wakeup() == pytest.approx(0.5)
        now[0] = 0.5
        assert b.dev.process_queue(0, b.q)
        assert b.d.used_idx() == 3 and b.used(2) == (6, 513)  # deferred, not dropped
        assert b.dev.blk_stats.throttled == 1 and b.dev.next_wakeup() is None
    finally:
        b.close()


def test_ops_limit_and_runtime_change(image: Path) -> None:
    """1 op/s after a 2-op bucket: the third read waits until the limit is lifted."""
    dev = open_disk(DiskSpec(image), SecurityEventLog(),
                    rate_limiter=RateLimiter(ops=BucketSpec(2, 0.001)))
    r = Rig(dev)
    try:
        r.bring_up()
        for h in (0, 3, 6):
            rig_request(r, h, T.IN, h, 512)
        r.q.publish(0, 3, 6)
        os.eventfd_write(r.t.notify_fds[0], 1)
        assert wait_for(lambda: r.q.used_idx() == 2)
        time.sleep(0.05)
        assert r.q.used_idx() == 2
        dev.set_rate_limit(ops=None)
        assert wait_for(lambda: r.q.used_idx() == 3)
        assert r.mem.read_exact(BUF_ADDR + 6 * 0x20000 + 0x1000, 512) == sector_bytes(6)
    finally:
        r.close()
        dev.disk.close()


def test_close_closes_the_image(image: Path) -> None:
    dev = open_disk(DiskSpec(image), SecurityEventLog())
    fd = dev.disk.fd
    dev.close()
    with pytest.raises(OSError):
        os.fstat(fd)
