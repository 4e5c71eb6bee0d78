"""The virtio-mmio transport: registers, the status state machine, legacy refusal, queue
setup checks, reset, config generation, interrupts, NEEDS_RESET, and a register fuzzer."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isovisor.devices.events import SecurityEventLog
from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.device import DeviceState, VirtioDevice
from isovisor.devices.virtio.queue import Virtqueue
from isovisor.memory.layout import VIRTIO_MMIO_BASE, MiB
from tests.devices.virtio import (
    AVAIL_ADDR,
    BUF_ADDR,
    DESC_ADDR,
    OK,
    USED_ADDR,
    FakeDriver,
    Rig,
    readable,
    wait_for,
)

BASE = VIRTIO_MMIO_BASE


class ConfigDevice(VirtioDevice):
    """A device with an 8-byte config space whose second word the driver may write."""

    device_type = 0x7F
    queue_max_sizes = (16, 8)
    name = "virtio-test"

    def __init__(self, events: SecurityEventLog) -> None:
        super().__init__(events)
        self.config = bytearray(b"\x11\x22\x33\x44\0\0\0\0")

    def device_features(self) -> int:
        return 1 << 5

    def config_space(self) -> bytes:
        return bytes(self.config)

    def config_write(self, offset: int, data: bytes) -> None:
        if offset >= 4:
            self.config[offset : offset + len(data)] = data

    def process_queue(self, index: int, queue: Virtqueue) -> bool:
        while (ch := queue.pop()) is not None:
            queue.add_used(ch.head, 0)
        return True


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


@pytest.fixture
def cfg_rig() -> Iterator[Rig]:
    r = Rig(ConfigDevice(SecurityEventLog()))
    yield r
    r.close()


# --- identification and features (§4.2.2) -----------------------------------------------


def test_identification_registers(rig: Rig) -> None:
    assert rig.rd(c.MMIO_MAGIC_VALUE) == 0x74726976
    assert rig.rd(c.MMIO_VERSION) == 2
    assert rig.rd(c.MMIO_DEVICE_ID) == c.DEVICE_ID_ENTROPY
    assert rig.rd(c.MMIO_VENDOR_ID) == c.MMIO_VENDOR
    assert rig.t.source == rig.dev.source == f"virtio-rng@{BASE:#x}"


def test_device_features_by_word(cfg_rig: Rig) -> None:
    r = cfg_rig
    r.wr(c.MMIO_DEVICE_FEATURES_SEL, 0)
    assert r.rd(c.MMIO_DEVICE_FEATURES) == (1 << 5) | (1 << 28) | (1 << 29)
    r.wr(c.MMIO_DEVICE_FEATURES_SEL, 1)
    assert r.rd(c.MMIO_DEVICE_FEATURES) == 1  # VIRTIO_F_VERSION_1 is bit 32
    r.wr(c.MMIO_DEVICE_FEATURES_SEL, 2)
    assert r.rd(c.MMIO_DEVICE_FEATURES) == 0


def test_control_registers_need_aligned_32_bit_access(rig: Rig) -> None:
    assert rig.t.read(c.MMIO_MAGIC_VALUE, 1) == b"\0"
    assert rig.t.read(c.MMIO_MAGIC_VALUE + 2, 4) == b"\0" * 4
    rig.t.write(c.MMIO_STATUS, b"\x01")
    assert rig.rd(c.MMIO_STATUS) == 0
    assert rig.t.stats.bad_accesses == 3


def test_write_only_and_undefined_registers(rig: Rig) -> None:
    assert rig.rd(c.MMIO_QUEUE_NUM) == 0
    assert rig.rd(0x0F0) == 0
    rig.wr(c.MMIO_MAGIC_VALUE, 0)
    assert rig.rd(c.MMIO_MAGIC_VALUE) == c.MMIO_MAGIC
    assert rig.rd(c.MMIO_SHM_LEN_LOW) == rig.rd(c.MMIO_SHM_BASE_HIGH) == 0xFFFF_FFFF
    assert rig.rd(c.MMIO_QUEUE_RESET) == 0


# --- status state machine (§2.1, §3.1.1) ---------------------------------------------------


def test_status_happy_path(rig: Rig) -> None:
    rig.bring_up()
    assert rig.dev.state is DeviceState.ACTIVE
    assert rig.dev.acked_features == c.F_VERSION_1


@pytest.mark.parametrize(
    "steps",
    [
        [c.STATUS_DRIVER],  # DRIVER before ACKNOWLEDGE
        [1, 1 | c.STATUS_FEATURES_OK],  # skipping DRIVER
        [1, 3, 3 | c.STATUS_DRIVER_OK],  # DRIVER_OK before FEATURES_OK
        [1, 3 | c.STATUS_FEATURES_OK],  # two bits at once
        [1, 3, 2],  # clearing ACKNOWLEDGE
        [1, 1 | 0x10],  # an undefined bit
    ],
)
def test_out_of_order_status_is_rejected(rig: Rig, steps: list[int]) -> None:
    before = 0
    for i, value in enumerate(steps):
        got = rig.status(value)
        if i < len(steps) - 1:
            before = got
    assert rig.rd(c.MMIO_STATUS) == before
    assert rig.t.stats.rejected_status == 1
    assert rig.dev.state is DeviceState.INACTIVE


def test_rewriting_the_same_status_is_harmless(rig: Rig) -> None:
    rig.status(1)
    assert rig.status(1) == 1
    assert rig.t.stats.rejected_status == 0


def test_legacy_driver_is_refused(rig: Rig) -> None:
    """§4.2 / §6: without VIRTIO_F_VERSION_1 FEATURES_OK does not stick."""
    st_ = rig.negotiate(features=c.F_EVENT_IDX)
    assert not st_ & c.STATUS_FEATURES_OK
    assert rig.t.stats.refused_features == 1
    assert rig.status(st_ | c.STATUS_DRIVER_OK) == st_  # and it cannot go further


def test_features_not_offered_are_refused(rig: Rig) -> None:
    assert not rig.negotiate(features=c.F_VERSION_1 | c.F_RING_PACKED) & c.STATUS_FEATURES_OK


def test_driver_features_frozen_after_features_ok(rig: Rig) -> None:
    rig.negotiate(c.F_VERSION_1 | c.F_EVENT_IDX)
    rig.wr(c.MMIO_DRIVER_FEATURES_SEL, 0)
    rig.wr(c.MMIO_DRIVER_FEATURES, 0)
    rig.setup_queue()
    rig.status(OK)
    assert rig.dev.acked_features == c.F_VERSION_1 | c.F_EVENT_IDX


def test_failed_stops_the_device_until_reset(rig: Rig) -> None:
    rig.bring_up()
    assert rig.status(OK | c.STATUS_FAILED) == OK | c.STATUS_FAILED
    assert rig.dev.state is DeviceState.INACTIVE
    assert rig.status(1) == OK | c.STATUS_FAILED  # only a reset leaves FAILED
    assert rig.status(0) == 0


# --- queue setup (§2.7, §4.2.3.2) -----------------------------------------------------------


def test_queue_registers(rig: Rig) -> None:
    rig.negotiate()
    rig.wr(c.MMIO_QUEUE_SEL, 0)
    assert rig.rd(c.MMIO_QUEUE_NUM_MAX) == 256
    assert rig.rd(c.MMIO_QUEUE_READY) == 0
    rig.wr(c.MMIO_QUEUE_SEL, 1)  # rng has a single queue
    assert rig.rd(c.MMIO_QUEUE_NUM_MAX) == 0
    rig.wr(c.MMIO_QUEUE_READY, 1)
    assert rig.rd(c.MMIO_QUEUE_READY) == 0
    rig.setup_queue(desc=0x1_2345_6780)  # high words are kept: this one is not RAM
    assert rig.rd(c.MMIO_STATUS) & c.STATUS_DEVICE_NEEDS_RESET
    assert "0x123456780" in rig.events.events()[-1].detail


def test_queue_setup_needs_features_ok(rig: Rig) -> None:
    rig.status(1)
    rig.status(3)
    rig.setup_queue()
    assert rig.rd(c.MMIO_QUEUE_READY) == 0
    assert rig.t.stats.ignored_queue_writes > 0


def test_queue_fields_frozen_while_ready(rig: Rig) -> None:
    rig.negotiate()
    rig.setup_queue()
    rig.wr(c.MMIO_QUEUE_DESC_LOW, 0xFFF0_0000)
    assert rig.t.queues[0].desc_table == DESC_ADDR
    rig.wr(c.MMIO_QUEUE_READY, 0)
    rig.wr(c.MMIO_QUEUE_DESC_LOW, 0x50000)
    assert rig.t.queues[0].desc_table == 0x50000


@pytest.mark.parametrize(
    ("size", "addrs", "why"),
    [
        (12, {}, "power of two"),
        (512, {}, "power of two"),  # above QueueNumMax
        (16, {"desc": DESC_ADDR + 8}, "aligned"),
        (16, {"avail": AVAIL_ADDR + 1}, "aligned"),
        (16, {"used": USED_ADDR + 2}, "aligned"),
        (16, {"used": 16 * MiB - 64}, "runs past RAM"),  # avail_event beyond the end
        (16, {"desc": VIRTIO_MMIO_BASE}, "not RAM"),  # a ring overlapping MMIO
    ],
)
def test_bad_queue_setup_needs_reset(rig: Rig, size: int, addrs: dict[str, int], why: str) -> None:
    rig.negotiate()
    rig.setup_queue(size=size, **addrs)
    assert rig.rd(c.MMIO_QUEUE_READY) == 0
    assert rig.rd(c.MMIO_STATUS) & c.STATUS_DEVICE_NEEDS_RESET
    ev = rig.events.events()
    assert len(ev) == 1 and ev[0].kind == "virtio-needs-reset" and why in ev[0].detail
    # DRIVER_OK is refused until the driver resets the device.
    rig.status(OK)
    assert rig.dev.state is DeviceState.INACTIVE
    rig.bring_up()
    assert rig.dev.state.value == "active"


# --- reset and config space ----------------------------------------------------------------


def test_reset_returns_to_zero_state(cfg_rig: Rig) -> None:
    r = cfg_rig
    fresh = r.dump()
    r.bring_up(c.F_VERSION_1 | c.F_EVENT_IDX)
    r.dev.config_changed()
    r.wr(c.MMIO_QUEUE_SEL, 1)
    assert r.dump() != fresh
    r.status(0)
    assert r.dump() == fresh
    assert r.dev.state is DeviceState.INACTIVE and r.dev.acked_features == 0
    assert all(not q.ready and q.size == q.max_size and q.desc_table == 0 for q in r.t.queues)


def test_config_space_bounds(cfg_rig: Rig) -> None:
    r = cfg_rig
    assert r.t.read(c.MMIO_CONFIG, 4) == b"\x11\x22\x33\x44"
    assert r.t.read(c.MMIO_CONFIG + 1, 2) == b"\x22\x33"
    assert r.t.read(c.MMIO_CONFIG + 6, 4) == b"\0" * 4  # crosses the end: zeros
    assert r.t.read(0xFFC, 4) == b"\0" * 4
    r.t.write(c.MMIO_CONFIG, b"\xAA")  # the device keeps its first word read-only
    r.t.write(c.MMIO_CONFIG + 4, b"\x01\x02")
    r.t.write(c.MMIO_CONFIG + 7, b"\x01\x02")  # crosses the end: ignored
    assert r.t.read(c.MMIO_CONFIG, 8) == b"\x11\x22\x33\x44\x01\x02\0\0"


def test_config_generation_and_interrupt(cfg_rig: Rig) -> None:
    r = cfg_rig
    r.bring_up()
    gen = r.rd(c.MMIO_CONFIG_GENERATION)
    r.dev.config_changed()
    assert r.rd(c.MMIO_CONFIG_GENERATION) == gen + 1
    assert r.rd(c.MMIO_INTERRUPT_STATUS) == c.INT_CONFIG_CHANGE
    assert readable(r.t.irq_fd)
    r.wr(c.MMIO_INTERRUPT_ACK, c.INT_CONFIG_CHANGE)
    assert r.rd(c.MMIO_INTERRUPT_STATUS) == 0


# --- the data path ------------------------------------------------------------------------


def post_rng_request(r: Rig, head: int = 0, length: int = 64) -> None:
    r.q.writable_chain(head, BUF_ADDR + head * 0x1000, length)
    r.q.publish(head)


def test_rng_request_through_ioeventfd_and_irqfd(rig: Rig) -> None:
    rig.bring_up(c.F_VERSION_1 | c.F_EVENT_IDX)
    post_rng_request(rig)
    os.eventfd_write(rig.t.notify_fds[0], 1)  # what KVM does on the guest's notify write
    assert wait_for(lambda: rig.q.used_idx() == 1)
    assert rig.q.used_elem(0) == (0, 64)
    assert rig.mem.read_exact(BUF_ADDR, 64) != bytes(64)
    assert readable(rig.t.irq_fd)
    assert wait_for(lambda: rig.rd(c.MMIO_INTERRUPT_STATUS) == c.INT_USED_BUFFER)
    rig.wr(c.MMIO_INTERRUPT_ACK, c.INT_USED_BUFFER)
    assert rig.rd(c.MMIO_INTERRUPT_STATUS) == 0
    assert rig.t.stats.fallback_notifies == 0


def test_notify_through_the_bus_is_forwarded(rig: Rig) -> None:
    rig.bring_up()
    post_rng_request(rig)
    rig.t.write(c.MMIO_QUEUE_NOTIFY, b"\0\0")  # a 16-bit write: no ioeventfd match
    assert wait_for(lambda: rig.q.used_idx() == 1)
    assert rig.t.stats.fallback_notifies == 1
    rig.wr(c.MMIO_QUEUE_NOTIFY, 5)  # no such queue
    assert rig.t.stats.bad_accesses == 1


def test_hostile_chain_needs_reset_and_recovers(rig: Rig) -> None:
    rig.bring_up()
    rig.q.set_desc(0, BUF_ADDR, 64, c.DESC_F_WRITE | c.DESC_F_NEXT, 0)  # next = itself
    rig.q.publish(0)
    os.eventfd_write(rig.t.notify_fds[0], 1)
    assert wait_for(lambda: rig.rd(c.MMIO_STATUS) & c.STATUS_DEVICE_NEEDS_RESET)
    assert rig.dev.state is DeviceState.BROKEN
    assert rig.rd(c.MMIO_INTERRUPT_STATUS) & c.INT_CONFIG_CHANGE  # §2.1.2
    (ev,) = rig.events.events()
    assert ev.kind == "virtio-needs-reset" and "hops" in ev.detail
    # Further notifies are not served; the guest resets and starts over.
    os.eventfd_write(rig.t.notify_fds[0], 1)
    time.sleep(0.05)
    assert rig.q.used_idx() == 0
    rig.q = FakeDriver(rig.mem, 16)
    rig.mem.fill(AVAIL_ADDR, 0x1000)
    rig.mem.fill(USED_ADDR, 0x1000)
    rig.bring_up()
    post_rng_request(rig, head=1)
    os.eventfd_write(rig.t.notify_fds[0], 1)
    assert wait_for(lambda: rig.q.used_idx() == 1)


def test_queue_ready_zero_stops_the_device(rig: Rig) -> None:
    rig.bring_up()
    rig.wr(c.MMIO_QUEUE_READY, 0)
    assert rig.rd(c.MMIO_QUEUE_READY) == 0
    assert rig.dev.state is DeviceState.INACTIVE
    post_rng_request(rig)
    os.eventfd_write(rig.t.notify_fds[0], 1)
    time.sleep(0.05)
    assert rig.q.used_idx() == 0  # §4.2.2.1: the queue is not touched any more


# --- fuzzing the register interface ------------------------------------------------------

_REGS = [
    c.MMIO_DEVICE_FEATURES_SEL,
    c.MMIO_DRIVER_FEATURES,
    c.MMIO_DRIVER_FEATURES_SEL,
    c.MMIO_QUEUE_SEL,
    c.MMIO_QUEUE_NUM,
    c.MMIO_QUEUE_READY,
    c.MMIO_QUEUE_NOTIFY,
    c.MMIO_INTERRUPT_ACK,
    c.MMIO_STATUS,
    c.MMIO_QUEUE_DESC_LOW,
    c.MMIO_QUEUE_DESC_HIGH,
    c.MMIO_QUEUE_DRIVER_LOW,
    c.MMIO_QUEUE_DRIVER_HIGH,
    c.MMIO_QUEUE_DEVICE_LOW,
    c.MMIO_QUEUE_DEVICE_HIGH,
    c.MMIO_SHM_SEL,
    c.MMIO_QUEUE_RESET,
    c.MMIO_CONFIG,
]
_value = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 8, 11, 15, 16, 0x80, 0xFF, DESC_ADDR, AVAIL_ADDR, USED_ADDR]),
    st.integers(0, 0xFFFF_FFFF),
)
_access = st.tuples(
    st.one_of(st.sampled_from(_REGS), st.integers(0, 0xFFF)),
    _value,
    st.sampled_from([1, 2, 4, 4, 4, 8]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=st.lists(_access, max_size=40), chains=st.binary(min_size=64, max_size=64))
def test_fuzz_registers_never_raise_and_device_works_or_needs_reset(
    writes: list[tuple[int, int, int]], chains: bytes
) -> None:
    r = Rig()
    try:
        r.mem.write_all(DESC_ADDR, chains)  # whatever the rings hold is hostile too
        r.mem.write_all(AVAIL_ADDR, chains[:8])
        for off, value, width in writes:
            r.t.write(off, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))
            r.t.read(off & ~3, 4)
        status = r.rd(c.MMIO_STATUS)
        assert status & ~(0xFF) == 0
        for fd in r.t.notify_fds:
            os.eventfd_write(fd, 1)
        time.sleep(0.005)
        state = r.dev.state
        if status & c.STATUS_DEVICE_NEEDS_RESET or state is DeviceState.BROKEN:
            assert r.events.total >= 1
        # Whatever happened, a reset and a clean initialisation give a working device.
        r.mem.fill(0, 0x40000)
        r.bring_up()
        post_rng_request(r)
        os.eventfd_write(r.t.notify_fds[0], 1)
        assert wait_for(lambda: r.q.used_idx() == 1)
    finally:
        r.close()
