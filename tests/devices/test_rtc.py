"""The CMOS RTC: time in BCD/binary and 12/24h, control registers, memory fields."""

from __future__ import annotations

import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.devices.bus import pio_bus
from isovisor.devices.legacy import rtc as r
from isovisor.devices.legacy.rtc import CmosRtc
from isovisor.memory.layout import GiB, MiB

# Saturday 2024-03-09 21:07:05 UTC.
WHEN = datetime.datetime(2024, 3, 9, 21, 7, 5, tzinfo=datetime.UTC)


class Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


def reg(dev: CmosRtc, index: int) -> int:
    dev.write(r.INDEX_OFFSET, bytes((index,)))
    return dev.read(r.DATA_OFFSET, 1)[0]


def set_reg(dev: CmosRtc, index: int, value: int) -> None:
    dev.write(r.INDEX_OFFSET, bytes((index,)))
    dev.write(r.DATA_OFFSET, bytes((value,)))


def time_regs(dev: CmosRtc) -> list[int]:
    return [reg(dev, i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]


def test_default_is_bcd_24h() -> None:
    dev = CmosRtc(clock=Clock(WHEN))
    assert reg(dev, r.REG_B) == 0x02
    assert time_regs(dev) == [0x05, 0x07, 0x21, 0x07, 0x09, 0x03, 0x24, 0x20]


def test_binary_mode() -> None:
    dev = CmosRtc(clock=Clock(WHEN))
    set_reg(dev, r.REG_B, r.REG_B_24H | r.REG_B_DM_BINARY)
    assert time_regs(dev) == [5, 7, 21, 7, 9, 3, 24, 20]


def test_12_hour_mode_bcd_and_binary() -> None:
    clock = Clock(WHEN)
    dev = CmosRtc(clock=clock)
    set_reg(dev, r.REG_B, 0x00)  # BCD, 12-hour
    assert reg(dev, r.REG_HOURS) == 0x80 | 0x09  # 21h = 9 PM
    set_reg(dev, r.REG_B, r.REG_B_DM_BINARY)
    assert reg(dev, r.REG_HOURS) == 0x80 | 9
    clock.now = WHEN.replace(hour=0)
    assert reg(dev, r.REG_HOURS) == 12  # midnight = 12 AM
    clock.now = WHEN.replace(hour=12)
    assert reg(dev, r.REG_HOURS) == 0x80 | 12  # noon = 12 PM
    set_reg(dev, r.REG_B, 0x00)
    clock.now = WHEN.replace(hour=11)
    assert reg(dev, r.REG_HOURS) == 0x11


def test_day_of_week_sunday_is_one() -> None:
    dev = CmosRtc(clock=Clock(WHEN.replace(day=10)))  # a Sunday
    assert reg(dev, r.REG_DAY_OF_WEEK) == 1


def test_time_is_read_afresh_and_naive_clock_is_utc() -> None:
    clock = Clock(WHEN)
    dev = CmosRtc(clock=clock)
    assert reg(dev, r.REG_SECONDS) == 0x05
    clock.now = WHEN + datetime.timedelta(seconds=54)
    assert reg(dev, r.REG_SECONDS) == 0x59
    clock.now = datetime.datetime(
        2031, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    assert reg(dev, r.REG_HOURS) == 0x01  # converted to UTC
    clock.now = datetime.datetime(2031, 1, 2, 3, 4, 5)
    assert reg(dev, r.REG_HOURS) == 0x03


def test_set_bit_freezes_time_and_time_writes_are_ignored() -> None:
    clock = Clock(WHEN)
    dev = CmosRtc(clock=clock)
    set_reg(dev, r.REG_B, r.REG_B_DEFAULT | r.REG_B_SET)
    clock.now = WHEN + datetime.timedelta(seconds=10)
    set_reg(dev, r.REG_SECONDS, 0x30)
    assert reg(dev, r.REG_SECONDS) == 0x05
    set_reg(dev, r.REG_B, r.REG_B_DEFAULT)
    assert reg(dev, r.REG_SECONDS) == 0x15


def test_control_registers() -> None:
    dev = CmosRtc(clock=Clock(WHEN))
    assert reg(dev, r.REG_A) == 0x26  # UIP clear
    set_reg(dev, r.REG_A, 0xFF)
    assert reg(dev, r.REG_A) == 0x7F  # UIP cannot be set
    assert reg(dev, r.REG_D) == 0x80
    set_reg(dev, r.REG_D, 0x00)
    assert reg(dev, r.REG_D) == 0x80
    dev._cmos[r.REG_C] = 0x90
    assert reg(dev, r.REG_C) == 0x90
    assert reg(dev, r.REG_C) == 0x00  # read clears


def test_nmi_bit_in_index_is_ignored_and_ram_holds() -> None:
    dev = CmosRtc(clock=Clock(WHEN))
    set_reg(dev, 0x80 | 0x40, 0xAB)
    assert reg(dev, 0x40) == 0xAB
    assert reg(dev, 0x80 | 0x40) == 0xAB
    assert dev.read(r.INDEX_OFFSET, 1) == b"\xff"


def test_memory_size_fields() -> None:
    dev = CmosRtc(memory_size=512 * MiB, clock=Clock(WHEN))
    assert reg(dev, 0x15) | reg(dev, 0x16) << 8 == 640
    assert reg(dev, 0x17) | reg(dev, 0x18) << 8 == 0xFFFF  # capped
    assert reg(dev, 0x34) | reg(dev, 0x35) << 8 == (512 - 16) * MiB // (64 * 1024)
    assert reg(dev, 0x5B) | reg(dev, 0x5C) << 8 | reg(dev, 0x5D) << 16 == 0

    small = CmosRtc(memory_size=32 * MiB, clock=Clock(WHEN))
    assert small._cmos[0x17] | small._cmos[0x18] << 8 == 31 * 1024

    big = CmosRtc(memory_size=8 * GiB, clock=Clock(WHEN))
    below = 0xC000_0000
    assert big._cmos[0x34] | big._cmos[0x35] << 8 == (below - 16 * MiB) // (64 * 1024)
    high = big._cmos[0x5B] | big._cmos[0x5C] << 8 | big._cmos[0x5D] << 16
    assert high == (8 * GiB - below) // (64 * 1024)


def test_on_the_bus_with_a_word_write() -> None:
    dev = CmosRtc(clock=Clock(WHEN))
    bus = pio_bus()
    bus.register(r.RTC_PORT_BASE, r.RTC_PORT_COUNT, dev, "cmos-rtc")
    bus.write(0x70, bytes((0x50, 0x77)))  # index, then data, byte by byte
    bus.write(0x70, b"\x09")
    assert bus.read(0x71, 1) == b"\x24"
    bus.write(0x70, b"\x50")
    assert bus.read(0x71, 1) == b"\x77"


ops = st.tuples(
    st.booleans(),
    st.integers(-1, 3),
    st.sampled_from([1, 2, 4, 8]),
    st.binary(min_size=1, max_size=8),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=80), st.datetimes(timezones=st.just(datetime.UTC)))
def test_random_accesses_never_raise_and_stay_bounded(
    seq: list[tuple[bool, int, int, bytes]], now: datetime.datetime
) -> None:
    dev = CmosRtc(memory_size=1 * GiB, clock=Clock(now))
    for is_read, offset, size, data in seq:
        if is_read:
            assert len(dev.read(offset, size)) == size
        else:
            dev.write(offset, data)
        assert len(dev._cmos) == r.CMOS_SIZE
        assert 0 <= dev._index < r.CMOS_SIZE
