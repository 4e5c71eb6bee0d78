"""The CMOS real-time clock (MC146818 as in the PC) at ports 0x70 (index) and 0x71 (data).

Register it as one two-byte range:

    bus.register(RTC_PORT_BASE, RTC_PORT_COUNT, rtc, "cmos-rtc")

Offset 0 is the index register (bit 7, the NMI mask, is ignored), offset 1 the data
register; wider accesses (up to 8 bytes) are taken a byte at a time, and offsets beyond
the two ports read as all-ones and are ignored on write.

The time registers show the host's current UTC time, read afresh on every access, in BCD
or binary and 12- or 24-hour form as register B asks. Guest writes to them are ignored:
a guest cannot move the host's clock, and keeping no per-VM offset keeps the model small.
While register B's SET bit is on, the time reads frozen at the moment it was set, as the
datasheet's "update cycle inhibited" describes. Update-in-progress is never shown and
no interrupts are generated (there is no IRQ 8 line). The other bytes are plain CMOS RAM,
with the memory-size fields firmware and some loaders read filled in like QEMU's.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable

from isovisor.memory.layout import MMIO_HOLE_START, MiB

RTC_PORT_BASE = 0x70
RTC_PORT_COUNT = 2
INDEX_OFFSET = 0
DATA_OFFSET = 1
MAX_ACCESS = 8  # the widest access a CPU makes
INDEX_MASK = 0x7F  # bit 7 of the index port masks NMI: ignored
CMOS_SIZE = 128

# Time registers.
REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_DAY_OF_WEEK = 0x06  # 1 = Sunday
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09  # two digits
REG_CENTURY = 0x32  # the IBM PC century byte (ACPI FADT "century" points here)
# Control registers.
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D

REG_A_UIP = 0x80  # update in progress: never set here
REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_SET = 0x80  # updates inhibited while the guest sets the time
REG_B_DM_BINARY = 0x04  # data mode: binary (clear = BCD)
REG_B_24H = 0x02  # 24-hour mode (clear = 12-hour, bit 7 of the hour = PM)
REG_B_DEFAULT = REG_B_24H  # BCD, 24-hour: what PC firmware leaves
REG_D_VRT = 0x80  # valid RAM and time
HOUR_PM = 0x80

# Memory-size fields (QEMU's layout, read by SeaBIOS and some boot loaders).
REG_BASE_MEM_LO = 0x15  # base memory in KiB (640)
REG_BASE_MEM_HI = 0x16
REG_EXT_MEM_LO = 0x17  # memory above 1 MiB in KiB, capped at 0xFFFF
REG_EXT_MEM_HI = 0x18
REG_EXT_MEM2_LO = 0x30  # the same again
REG_EXT_MEM2_HI = 0x31
REG_MEM_16M_LO = 0x34  # memory between 16 MiB and 4 GiB in 64 KiB units, capped at 0xFFFF
REG_MEM_16M_HI = 0x35
REG_MEM_4G_LO = 0x5B  # memory above 4 GiB in 64 KiB units, three bytes
BASE_MEMORY_KIB = 640
MEM_UNIT = 64 * 1024

_TIME_REGISTERS = frozenset(
    {
        REG_SECONDS,
        REG_MINUTES,
        REG_HOURS,
        REG_DAY_OF_WEEK,
        REG_DAY_OF_MONTH,
        REG_MONTH,
        REG_YEAR,
        REG_CENTURY,
    }
)

Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def to_bcd(value: int) -> int:
    """0..99 as two BCD digits."""
    return ((value // 10) % 10) << 4 | value % 10


class CmosRtc:
    """The RTC and its CMOS RAM. `memory_size` (guest RAM bytes) fills the size fields."""

    def __init__(self, memory_size: int = 0, clock: Clock = utc_now) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._cmos = bytearray(CMOS_SIZE)
        self._index = 0
        self._frozen: datetime.datetime | None = None  # the time while SET is on
        self._cmos[REG_A] = REG_A_DEFAULT
        self._cmos[REG_B] = REG_B_DEFAULT
        self._fill_memory_size(max(memory_size, 0))

    # -- BusDevice --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if not 0 < size <= MAX_ACCESS:
            return b"\xff" * max(size, 0)  # not an access a CPU makes: no side effects
        with self._lock:
            out = bytearray()
            for i in range(size):
                port = offset + i
                if port == DATA_OFFSET:
                    out.append(self._read_register(self._index))
                else:
                    out.append(0xFF)  # the index port is write-only
            return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if len(data) > MAX_ACCESS:
            return
        with self._lock:
            for i, value in enumerate(data):
                port = offset + i
                if port == INDEX_OFFSET:
                    self._index = value & INDEX_MASK
                elif port == DATA_OFFSET:
                    self._write_register(self._index, value)

    # -- registers (lock held) --------------------------------------------------------

    def _read_register(self, reg: int) -> int:
        if reg in _TIME_REGISTERS:
            return self._time_field(reg)
        if reg == REG_A:
            return self._cmos[REG_A] & ~REG_A_UIP & 0xFF
        if reg == REG_C:
            value = self._cmos[REG_C]
            self._cmos[REG_C] = 0  # reading C acknowledges its flags
            return value
        if reg == REG_D:
            return REG_D_VRT
        return self._cmos[reg]

    def _write_register(self, reg: int, value: int) -> None:
        if reg in _TIME_REGISTERS or reg in (REG_C, REG_D):
            return  # the host's time, and read-only status registers
        if reg == REG_A:
            self._cmos[REG_A] = value & ~REG_A_UIP & 0xFF
        elif reg == REG_B:
            setting = bool(value & REG_B_SET)
            if setting and self._frozen is None:
                self._frozen = self._now()
            elif not setting:
                self._frozen = None
            self._cmos[REG_B] = value
        else:
            self._cmos[reg] = value

    def _now(self) -> datetime.datetime:
        if self._frozen is not None:
            return self._frozen
        now = self._clock()
        if now.tzinfo is not None:
            now = now.astimezone(datetime.UTC)
        return now

    def _time_field(self, reg: int) -> int:
        now = self._now()
        binary = bool(self._cmos[REG_B] & REG_B_DM_BINARY)

        def encode(value: int) -> int:
            return value if binary else to_bcd(value)

        if reg == REG_SECONDS:
            return encode(now.second)
        if reg == REG_MINUTES:
            return encode(now.minute)
        if reg == REG_HOURS:
            if self._cmos[REG_B] & REG_B_24H:
                return encode(now.hour)
            hour12 = now.hour % 12 or 12
            return encode(hour12) | (HOUR_PM if now.hour >= 12 else 0)
        if reg == REG_DAY_OF_WEEK:
            return encode(now.isoweekday() % 7 + 1)  # Monday=1..Sunday=7 -> Sunday=1
        if reg == REG_DAY_OF_MONTH:
            return encode(now.day)
        if reg == REG_MONTH:
            return encode(now.month)
        if reg == REG_YEAR:
            return encode(now.year % 100)
        return encode(now.year // 100)  # REG_CENTURY

    def _fill_memory_size(self, size: int) -> None:
        below_4g = min(size, MMIO_HOLE_START)
        above_4g = size - below_4g
        self._put16(REG_BASE_MEM_LO, BASE_MEMORY_KIB)
        ext_kib = min(max(below_4g // 1024 - 1024, 0), 0xFFFF)
        self._put16(REG_EXT_MEM_LO, ext_kib)
        self._put16(REG_EXT_MEM2_LO, ext_kib)
        self._put16(REG_MEM_16M_LO, min(max(below_4g - 16 * MiB, 0) // MEM_UNIT, 0xFFFF))
        high = min(above_4g // MEM_UNIT, 0xFF_FFFF)
        self._cmos[REG_MEM_4G_LO : REG_MEM_4G_LO + 3] = high.to_bytes(3, "little")

    def _put16(self, reg: int, value: int) -> None:
        self._cmos[reg : reg + 2] = value.to_bytes(2, "little")
