"""virtio-rng: filling buffers, the per-request cap, bad requests, hostile chains, and the
rate limiter deferring (never dropping) requests."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from isovisor.devices.events import SecurityEventLog
from isovisor.devices.ratelimit import BucketSpec, RateLimiter
from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.chain import GuestProtocolError
from isovisor.devices.virtio.device import DeviceState
from isovisor.devices.virtio.queue import Virtqueue
from isovisor.devices.virtio.rng import MAX_REQUEST_BYTES, VirtioRng
from isovisor.memory import GuestMemory
from isovisor.memory.layout import MiB
from tests.devices.virtio import BUF_ADDR, FakeDriver, Rig, wait_for

N, W = c.DESC_F_NEXT, c.DESC_F_WRITE


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


def setup(
    mem: GuestMemory, limiter: RateLimiter | None = None
) -> tuple[VirtioRng, Virtqueue, FakeDriver]:
    dev = VirtioRng(SecurityEventLog(), rate_limiter=limiter)
    d = FakeDriver(mem, 16)
    return dev, Virtqueue(mem, d.config()), d


def test_identity() -> None:
    dev = VirtioRng(SecurityEventLog())
    assert dev.device_type == 4 and dev.queue_max_sizes == (256,)
    assert dev.config_space() == b"" and dev.device_features() == 0


def test_fills_every_writable_buffer(mem: GuestMemory) -> None:
    dev, q, d = setup(mem)
    d.set_desc(0, BUF_ADDR, 10, N | W, 1)
    d.set_desc(1, BUF_ADDR + 0x100, 30, W)
    d.publish(0)
    assert dev.process_queue(0, q)
    assert d.used_elem(0) == (0, 40)
    a, b = mem.read_exact(BUF_ADDR, 10), mem.read_exact(BUF_ADDR + 0x100, 30)
    assert a != bytes(10) and b != bytes(30)
    assert dev.rng_stats.requests == 1 and dev.rng_stats.bytes == 40


def test_different_bytes_each_time(mem: GuestMemory) -> None:
    dev, q, d = setup(mem)
    d.writable_chain(0, BUF_ADDR, 64)
    d.writable_chain(1, BUF_ADDR + 0x100, 64)
    d.publish(0, 1)
    dev.process_queue(0, q)
    assert mem.read_exact(BUF_ADDR, 64) != mem.read_exact(BUF_ADDR + 0x100, 64)


def test_request_is_capped(mem: GuestMemory) -> None:
    dev, q, d = setup(mem)
    d.writable_chain(0, BUF_ADDR, 1 * MiB)
    d.publish(0)
    dev.process_queue(0, q)
    assert d.used_elem(0) == (0, MAX_REQUEST_BYTES)
    assert mem.read_exact(BUF_ADDR + MAX_REQUEST_BYTES, 64) == bytes(64)  # untouched
    assert dev.rng_stats.capped == 1


def test_readable_buffer_is_a_bad_request(mem: GuestMemory) -> None:
    dev, q, d = setup(mem)
    d.set_desc(0, BUF_ADDR, 8, N, 1)
    d.set_desc(1, BUF_ADDR + 0x100, 8, W)
    d.writable_chain(2, BUF_ADDR + 0x200, 8)
    d.publish(0, 2)
    assert dev.process_queue(0, q)
    assert d.used_elem(0) == (0, 0)  # failed, not served
    assert d.used_elem(1) == (2, 8)  # and the device carried on
    assert mem.read_exact(BUF_ADDR + 0x100, 8) == bytes(8)
    assert dev.rng_stats.bad_requests == 1


def test_hostile_chain_raises_protocol_error(mem: GuestMemory) -> None:
    dev, q, d = setup(mem)
    d.set_desc(0, mem.size - 4, 64, W)  # outside RAM
    d.publish(0)
    with pytest.raises(GuestProtocolError):
        dev.process_queue(0, q)
    assert d.used_idx() == 0


def test_rate_limiter_defers_then_serves(mem: GuestMemory) -> None:
    clk = Clock()
    lim = RateLimiter(BucketSpec(100, 100.0), clock=clk)
    dev, q, d = setup(mem, lim)
    for h in range(3):
        d.writable_chain(h, BUF_ADDR + h * 0x100, 64)
    d.publish(0, 1, 2)
    assert not dev.process_queue(0, q)  # 64 served, the second waits
    assert d.used_idx() == 1
    assert dev.next_wakeup() == pytest.approx(0.28)  # 28 tokens short at 100/s
    clk.now = 0.28
    assert not dev.process_queue(0, q)
    assert d.used_idx() == 2 and d.used_elem(1)[0] == 1  # the deferred one, not dropped
    clk.now = 10
    assert dev.process_queue(0, q)
    assert d.used_idx() == 3 and dev.next_wakeup() is None
    assert dev.rng_stats.throttled == 2 and dev.rng_stats.requests == 3


def test_rate_limited_device_thread_holds_the_rate() -> None:
    """Through the transport and the I/O thread: 8 requests of 1 KiB at 4 KiB/s after a
    2 KiB bucket take about (8 - 2) / 4 = 1.5 s, and every one is served."""
    r = Rig(VirtioRng(SecurityEventLog(), rate_limiter=RateLimiter(BucketSpec(2048, 4096.0))))
    try:
        r.bring_up()
        for h in range(8):
            r.q.writable_chain(h, BUF_ADDR + h * 0x1000, 1024)
        start = time.monotonic()
        r.q.publish(*range(8))
        os.eventfd_write(r.t.notify_fds[0], 1)
        assert wait_for(lambda: r.q.used_idx() == 8, timeout=20)
        elapsed = time.monotonic() - start
        assert elapsed >= 1.4  # never faster than the rate (the upper bound is loose:
        assert elapsed <= 8.0  # two shared cores) and nothing was dropped
        assert all(r.q.used_elem(i) == (i, 1024) for i in range(8))
    finally:
        r.close()


def test_rate_change_at_runtime_releases_a_throttled_request() -> None:
    dev = VirtioRng(SecurityEventLog(), rate_limiter=RateLimiter(BucketSpec(64, 0.001)))
    r = Rig(dev)
    try:
        r.bring_up()
        r.q.writable_chain(0, BUF_ADDR, 64)
        r.q.writable_chain(1, BUF_ADDR + 0x1000, 64)
        r.q.publish(0, 1)
        os.eventfd_write(r.t.notify_fds[0], 1)
        assert wait_for(lambda: r.q.used_idx() == 1)
        time.sleep(0.05)
        assert r.q.used_idx() == 1  # the second waits ~18 hours at this rate
        dev.set_rate_limit(bandwidth=BucketSpec(1 << 20, float(1 << 20)))
        assert wait_for(lambda: r.q.used_idx() == 2)
    finally:
        r.close()


def test_hostile_chain_through_the_thread_needs_reset() -> None:
    r = Rig()
    try:
        r.bring_up()
        r.q.set_desc(0, 0xD000_0000, 64, W)  # the MMIO window itself
        r.q.publish(0)
        os.eventfd_write(r.t.notify_fds[0], 1)
        assert wait_for(lambda: r.dev.state is DeviceState.BROKEN)
        assert r.rd(c.MMIO_STATUS) & c.STATUS_DEVICE_NEEDS_RESET
        assert "not RAM" in r.events.events()[0].detail
    finally:
        r.close()


def test_reset_drops_a_deferred_request() -> None:
    dev = VirtioRng(SecurityEventLog(), rate_limiter=RateLimiter(BucketSpec(64, 0.001)))
    r = Rig(dev)
    try:
        r.bring_up()
        r.q.writable_chain(0, BUF_ADDR, 64)
        r.q.writable_chain(1, BUF_ADDR + 0x1000, 64)
        r.q.publish(0, 1)
        os.eventfd_write(r.t.notify_fds[0], 1)
        assert wait_for(lambda: dev.next_wakeup() is not None)
        r.status(0)
        assert dev.next_wakeup() is None and dev.state is DeviceState.INACTIVE
    finally:
        r.close()
